"""Pure parts of hakeeper.ha.ops and the switchover request model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hakeeper.core.cluster import ClusterView, Switchover, SwitchoverKind, SwitchoverStage
from hakeeper.core.config import DynamicConfig
from hakeeper.ha.ops import merge_patch
from hakeeper.ha.policy.switchover import switchover_live


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
    )
    back = Switchover.from_json(sw.to_json(), mod_revision=7)
    assert back is not None and back.mod_revision == 7
    assert back.to_json() == sw.to_json()
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
