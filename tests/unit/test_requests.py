"""Pure parts of hakeeper.ha.requests and the switchover request model."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakeeper.api.responses import ApiError
from hakeeper.api.server import REFUSAL_STATUS, parse_patch, refusal_response
from hakeeper.core.cluster import (
    ClusterView,
    Member,
    MemberRole,
    MemberState,
    Status,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.keys import Keys
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha import requests
from hakeeper.ha.policy.plans import plan_promotion
from hakeeper.ha.policy.switchover import switchover_live
from hakeeper.ha.requests import merge_patch
from tests.support.fake_etcd import FakeEtcd


def test_merge_patch_merges_objects_and_null_deletes() -> None:
    target = {"ttl": 5, "postgresql": {"parameters": {"work_mem": "4MB", "max_connections": 100}}}
    patch = {"ttl": 10, "postgresql": {"parameters": {"work_mem": None, "shared_buffers": "1GB"}}}
    assert merge_patch(target, patch) == {
        "ttl": 10,
        "postgresql": {"parameters": {"max_connections": 100, "shared_buffers": "1GB"}},
    }
    assert target["ttl"] == 5, "the target is not modified"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@given(target=st.dictionaries(st.text(max_size=3), json_values, max_size=4))
def test_merge_patch_with_itself_is_identity_without_nulls(target: dict[str, object]) -> None:
    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        return v

    clean = strip(target)
    assert merge_patch(clean, clean) == clean
    assert merge_patch(clean, {}) == clean


def test_switchover_request_round_trips_through_json() -> None:
    sw = Switchover(
        kind=SwitchoverKind.FAILOVER,
        leader=None,
        candidate="node2",
        requested_at=1.5,
        scheduled_at=None,
        force=True,
        stage=SwitchoverStage.HANDOVER,
        handover_at=2.5,
        allow_unsynced_slots=True,
    )
    back = Switchover.from_json(sw.to_json(), mod_revision=7)
    assert back is not None and back.mod_revision == 7
    assert back.to_json() == sw.to_json()
    assert back.allow_unsynced_slots is True
    # a request written by an earlier agent (no such field) reads as not overridden
    old = Switchover.from_json(b'{"kind": "switchover", "leader": "n1", "requested_at": 1}', 1)
    assert old is not None and old.allow_unsynced_slots is False
    assert Switchover.from_json(b"{not json", 1) is None
    assert Switchover.from_json(b'{"kind": "bogus", "requested_at": 1}', 1) is None


def test_a_request_expires_after_switchover_timeout_from_when_it_was_due() -> None:
    view = ClusterView(config=DynamicConfig(switchover_timeout=30))
    now = 1000.0
    plain = Switchover(SwitchoverKind.SWITCHOVER, "a", "b", requested_at=now)
    assert switchover_live(plain, view, now + 29)
    assert not switchover_live(plain, view, now + 31)
    scheduled = Switchover(SwitchoverKind.SWITCHOVER, "a", "b", requested_at=now, scheduled_at=now + 3600)
    assert switchover_live(scheduled, view, now + 1000)
    assert switchover_live(scheduled, view, now + 3620)
    assert not switchover_live(scheduled, view, now + 3631)
    handover = Switchover(
        SwitchoverKind.SWITCHOVER,
        "a",
        "b",
        requested_at=now,
        stage=SwitchoverStage.HANDOVER,
        handover_at=now + 50,
    )
    assert switchover_live(handover, view, now + 60)


# -- requests over the fake etcd: every refusal has the kind the API answers with --------------------


KEYS = Keys("/hakeeper/c1")
MB = 1 << 20


async def cluster(etcd: FakeEtcd, *, lagging: bool = False) -> ClusterStore:
    """n1 leads (initialized), n2 streams from it (``lagging``: 64 MB behind)."""
    store = ClusterStore(etcd, KEYS)
    lease = await etcd.lease_grant(30)
    term = await store.initialize(system_identifier="6999", leader="n1", lease=lease, config=DynamicConfig())
    assert term is not None
    lsn = 100 * MB
    await store.put_member(
        Member("n1", MemberRole.PRIMARY, MemberState.RUNNING, timeline=1, wal_lsn=lsn), lease
    )
    await store.put_member(
        Member(
            "n2",
            MemberRole.REPLICA,
            MemberState.STREAMING,
            timeline=1,
            wal_lsn=lsn - (64 * MB if lagging else 0),
            streaming_from="n1",
        ),
        lease,
    )
    assert await store.write_status(term, Status(lsn=lsn, timeline=1, term=term))
    return store


async def refusal(call: Awaitable[object]) -> Refused:
    with pytest.raises(Refused) as e:
        await call
    return e.value


async def test_switchover_requests_and_their_refusals() -> None:
    store = await cluster(FakeEtcd())
    sw = await requests.request_switchover(store, leader="n1", candidate="n2", now=1000.0)
    assert (sw.kind, sw.leader, sw.candidate) == (SwitchoverKind.SWITCHOVER, "n1", "n2") and sw.mod_revision
    assert (await store.read_view()).switchover == sw

    e = await refusal(requests.request_switchover(store, leader="n1", candidate="n2", now=1001.0))
    assert e.kind == RefusalKind.CONFLICT and "already pending" in e.message
    assert await requests.cancel_switchover(store) == sw
    e = await refusal(requests.cancel_switchover(store))
    assert e.kind == RefusalKind.NOT_FOUND and e.message == "no switchover is pending"

    e = await refusal(requests.request_switchover(store, leader="n1", candidate="n1"))
    assert e.kind == RefusalKind.INVALID and e.message == "candidate n1 is already the leader"
    e = await refusal(requests.request_switchover(store, leader="n9", candidate=None))
    assert e.kind == RefusalKind.PRECONDITION and "the leader is n1, not n9" in e.message
    e = await refusal(requests.request_switchover(store, leader="n1", candidate="n7"))
    assert e.kind == RefusalKind.PRECONDITION and "candidate n7 is not a member" in e.message
    e = await refusal(
        requests.request_switchover(store, leader=None, candidate=None, scheduled_at=1.0, now=100.0)
    )
    assert e.kind == RefusalKind.INVALID and e.message == "scheduled_at is in the past"
    # the slot guard's override is recorded: a scheduled request is checked when it becomes due
    later = await requests.request_switchover(
        store, leader="n1", candidate="n2", scheduled_at=5000.0, now=1000.0, allow_unsynced_slots=True
    )
    assert later.allow_unsynced_slots and (await store.read_view()).switchover == later
    await requests.cancel_switchover(store)

    view = await store.read_view()
    assert view.leader is not None and await store.release_leader("n1", view.leader.term)
    e = await refusal(requests.request_switchover(store, leader=None, candidate="n2"))
    assert e.kind == RefusalKind.PRECONDITION and "has no leader (use failover)" in e.message


async def test_a_request_written_concurrently_is_a_conflict() -> None:
    class RacingEtcd(FakeEtcd):
        """Another operator's request lands between our read and our write."""

        race = False

        async def txn(self, compare: Any, success: Any, failure: Any = None, **kw: Any) -> Any:
            if success and "request_put" in success[0] and self.race:
                self.race = False
                await self.put(
                    KEYS.switchover, Switchover(SwitchoverKind.FAILOVER, None, "n2", 1.0).to_json()
                )
            return await super().txn(compare, success, failure, **kw)

    etcd = RacingEtcd()
    store = await cluster(etcd)
    etcd.race = True
    e = await refusal(requests.request_switchover(store, leader="n1", candidate="n2"))
    assert e.kind == RefusalKind.CONFLICT
    assert e.message == "another switchover or failover request was written concurrently"


async def test_a_failover_to_a_lagging_candidate_needs_allow_data_loss() -> None:
    store = await cluster(FakeEtcd(), lagging=True)
    e = await refusal(requests.request_failover(store, candidate="n2"))
    assert e.kind == RefusalKind.PRECONDITION and "maximum_lag_on_failover" in e.message
    assert "allow_data_loss" in e.message
    assert e.facts["reason"] and "maximum_lag_on_failover" in e.facts["reason"]
    e = await refusal(requests.request_failover(store, candidate="n9"))
    assert e.kind == RefusalKind.PRECONDITION and "candidate n9 is not a member" in e.message
    e = await refusal(requests.request_failover(store, candidate="n1"))
    assert e.kind == RefusalKind.INVALID
    sw = await requests.request_failover(store, candidate="n2", allow_data_loss=True)
    assert sw.kind == SwitchoverKind.FAILOVER and sw.force and sw.leader == "n1"
    # written with the key agents of earlier versions read
    assert json.loads(sw.to_json())["force"] is True


async def test_allow_data_loss_is_not_recorded_for_an_eligible_candidate() -> None:
    store = await cluster(FakeEtcd())
    sw = await requests.request_failover(store, candidate="n2", allow_data_loss=True)
    assert sw.kind == SwitchoverKind.FAILOVER and not sw.force


async def test_config_patches_and_their_refusals() -> None:
    etcd = FakeEtcd()
    e = await refusal(requests.read_config(ClusterStore(etcd, KEYS)))
    assert e.kind == RefusalKind.UNAVAILABLE and "not initialized" in e.message
    store = await cluster(etcd)
    cfg, rev = await requests.read_config(store)
    assert cfg == DynamicConfig()
    new, new_rev = await requests.patch_config(store, {"loop_wait": 2}, expected_revision=rev)
    assert new.loop_wait == 2 and new_rev > rev
    e = await refusal(requests.patch_config(store, {"loop_wait": 3}, expected_revision=rev))
    assert (
        e.kind == RefusalKind.CONFLICT
        and e.message == f"the configuration changed (revision {new_rev}, not {rev})"
    )
    e = await refusal(requests.patch_config(store, {"ttl": 1}))
    assert e.kind == RefusalKind.INVALID and e.facts["errors"]
    e = await refusal(requests.patch_config(store, ["not", "an", "object"]))  # type: ignore[arg-type]
    assert e.kind == RefusalKind.INVALID and e.message == "the patch must be a JSON object"
    assert (await requests.set_pause(store, True)).pause
    assert (await store.read_view()).paused
    await etcd.put(KEYS.config, b"{broken")
    e = await refusal(requests.read_config(store))
    assert e.kind == RefusalKind.UNAVAILABLE and e.message.startswith("the stored configuration (revision ")
    assert "is invalid" in e.message


async def test_a_newer_agents_config_field_is_read_but_not_patched_away() -> None:
    """docs/decisions.md: the stored config ignores fields this version does not know (GET works,
    as the agents read it), but a PATCH from here would drop them, so it is refused."""
    etcd = FakeEtcd()
    store = await cluster(etcd)
    doc = json.loads(DynamicConfig(ttl=9).model_dump_json())
    doc["future_knob"] = 1
    await etcd.put(KEYS.config, json.dumps(doc))
    cfg, _ = await requests.read_config(store)
    assert cfg.ttl == 9
    e = await refusal(requests.patch_config(store, {"loop_wait": 2}))
    assert e.kind == RefusalKind.PRECONDITION and "future_knob" in e.message
    assert json.loads((await etcd.get(KEYS.config)).value)["future_knob"] == 1  # type: ignore[union-attr]


async def test_an_invalid_stored_config_is_repaired_from_the_agents_last_valid_one() -> None:
    """An invalid config written to etcd by someone else: GET says so (503), a PATCH through an
    agent that knows the last valid config applies to that one -- what the agents run on -- and
    compares against the invalid record's revision; an agent that has seen no valid config
    since it started refuses rather than patch its own bootstrap values."""
    etcd = FakeEtcd()
    store = await cluster(etcd)
    last_valid = (DynamicConfig(ttl=9, pause=True), 7)
    broken = await etcd.put(KEYS.config, '{"ttl": Infinity, "pause": "yes"}')
    e = await refusal(requests.read_config(store))
    assert e.kind == RefusalKind.UNAVAILABLE and "repairs it" in e.message
    e = await refusal(requests.patch_config(store, {"loop_wait": 2}))
    assert e.kind == RefusalKind.UNAVAILABLE and "cannot repair" in e.message
    e = await refusal(
        requests.patch_config(store, {"loop_wait": 2}, expected_revision=broken - 1, last_valid=last_valid)
    )
    assert e.kind == RefusalKind.CONFLICT  # If-Match still compares with the stored (invalid) record

    cfg, rev = await requests.patch_config(
        store, {"loop_wait": 2}, expected_revision=broken, last_valid=last_valid
    )

    assert rev > broken and cfg == DynamicConfig(ttl=9, pause=True, loop_wait=2)
    assert await requests.read_config(store) == (cfg, rev)


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        ({"switchover_timeout": float("inf")}, "finite"),
        ({"loop_wait": float("nan")}, "finite"),
        ({"postgresql": {"parameters": {"bad name": 1}}}, "not a PostgreSQL parameter name"),
        ({"postgresql": {"parameters": {"port\n": 1}}}, "not a PostgreSQL parameter name"),
        ({"postgresql": {"parameters": {"work_mem": "4MB\nrestore_command = 'x'"}}}, "line break"),
        ({"postgresql": {"parameters": {"restore_command": "cp %p /x"}}}, "runs a command"),
        ({"postgresql": {"parameters": {"shared_preload_libraries": "evil"}}}, "loads a library"),
    ],
)
async def test_a_patch_no_node_could_apply_is_invalid_and_the_stored_config_stays_valid(
    patch: dict[str, object], says: str
) -> None:
    etcd = FakeEtcd()
    store = await cluster(etcd)
    before = await etcd.get(KEYS.config)
    e = await refusal(requests.patch_config(store, patch))
    assert e.kind == RefusalKind.INVALID and says in str(e.facts["errors"]), e.facts
    after = await etcd.get(KEYS.config)
    assert after is not None and before is not None and after.mod_revision == before.mod_revision
    cfg, _ = await requests.read_config(store)  # still loads
    assert cfg == DynamicConfig()


@pytest.mark.parametrize("body", [b'{"ttl": Infinity}', b'{"ttl": NaN}', b'{"ttl": -Infinity}'])
def test_the_api_refuses_json_constants_no_setting_can_take(body: bytes) -> None:
    with pytest.raises(ApiError) as e:
        parse_patch(body)
    assert e.value.status == 400 and "is not a JSON number" in e.value.message


async def test_an_etcd_outage_is_unavailable() -> None:
    etcd = FakeEtcd()
    store = await cluster(etcd)
    etcd.fail = True
    for call in (
        requests.read_view(store),
        requests.request_switchover(store, leader="n1", candidate="n2"),
        requests.request_failover(store, candidate="n2"),
        requests.cancel_switchover(store),
        requests.read_config(store),
        requests.patch_config(store, {"pause": True}),
    ):
        e = await refusal(call)
        assert e.kind == RefusalKind.UNAVAILABLE and e.message.startswith("etcd unavailable: ")
    assert await requests.wait_for_new_leader(store, old_leader="n1", candidate=None, timeout=0.3) is None


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (RefusalKind.INVALID, 400),
        (RefusalKind.NOT_FOUND, 404),
        (RefusalKind.CONFLICT, 409),
        (RefusalKind.PRECONDITION, 412),
        (RefusalKind.UNAVAILABLE, 503),
    ],
)
def test_the_api_answers_each_refusal_with_its_status_and_the_same_body(
    kind: RefusalKind, status: int
) -> None:
    resp = refusal_response(Refused(kind, "why not", reason="lag", errors=[("ttl", "too small")]))
    assert resp.status == status
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "error": "why not",
        "reason": "lag",
        "errors": [{"field": "ttl", "message": "too small"}],
    }
    assert set(REFUSAL_STATUS) == set(RefusalKind)


@pytest.mark.parametrize(
    ("force", "reason"),
    [(False, "failover from n1"), (True, "failover from n1 (data loss accepted)")],
    ids=["eligible", "data loss accepted"],
)
def test_the_history_reason_says_whether_data_loss_was_accepted(force: bool, reason: str) -> None:
    sw = Switchover(kind=SwitchoverKind.FAILOVER, leader="n1", candidate="n2", requested_at=1.0, force=force)
    plan = plan_promotion(ClusterView(switchover=sw), "n2", "unused")
    assert plan.reason == reason and plan.request == sw
