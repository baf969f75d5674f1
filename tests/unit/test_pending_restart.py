"""pending_restart (issue 13, item 7): read from the probe, published in the member record,
shown by /status, /cluster and the metrics, and still readable from records of older agents."""

from __future__ import annotations

import json

import pytest

from hakeeper.api.status import cluster_status, node_status
from hakeeper.core.cluster import ClusterView, Member, MemberRole
from hakeeper.core.pgtypes import LocalState
from hakeeper.core.records import InvalidRecord
from hakeeper.ha.metrics import HaMetrics
from hakeeper.ha.policy.observe import Identity, member_record
from hakeeper.ha.snapshot import NodeSnapshot
from tests.support.builders import view

ME = Identity("a", "127.0.0.1", 5432, "http://127.0.0.1:8008", False, 1, False, False, 1, "1.0")


def probe(*pending: str, running: bool = True) -> LocalState:
    if not running:
        return LocalState.down("postmaster is not running")
    return LocalState(True, False, 1, 100, None, None, None, (), pending_restart=tuple(pending))


def record(p: LocalState | None, scheduled: float | None = None) -> Member:
    return member_record(
        ME,
        probe=p,
        activity=None,
        initialized=True,
        view=view(leader="a"),
        now_wall=1000.0,
        scheduled_restart=scheduled,
    )


def snapshot(me: Member) -> NodeSnapshot:
    return NodeSnapshot(
        name=me.name,
        scope="c",
        tags={},
        probe=probe(*me.pending_restart_reasons),
        view=ClusterView(members={me.name: me}),
        member=me,
        activity=None,
        decision=None,
        loop_heartbeat=0.0,
        lease_remaining=1.0,
        writable=False,
        backup=None,
    )


def test_member_record_carries_the_probe_s_pending_restart() -> None:
    m = record(probe("max_connections", "shared_buffers"), scheduled=2000.0)
    assert m.pending_restart is True
    assert m.pending_restart_reasons == ("max_connections", "shared_buffers")
    assert m.scheduled_restart == 2000.0
    # after the restart the probe reports nothing pending: the record clears
    cleared = record(probe())
    assert cleared.pending_restart is False and cleared.pending_restart_reasons == ()
    assert cleared.scheduled_restart is None
    # a stopped server has nothing pending (the next start applies the files)
    assert record(probe(running=False)).pending_restart is False


def test_record_round_trip_and_older_records_without_the_fields() -> None:
    m = record(probe("max_connections"), scheduled=2000.0)
    back = Member.parse("a", m.to_json(), lease=7)
    assert back.pending_restart is True
    assert back.pending_restart_reasons == ("max_connections",)
    assert isinstance(back.pending_restart_reasons, tuple)
    assert back.scheduled_restart == 2000.0
    old = json.loads(m.to_json())
    for field in ("pending_restart", "pending_restart_reasons", "scheduled_restart"):
        del old[field]
    older = Member.parse("a", json.dumps(old).encode())
    assert older.pending_restart is False and older.pending_restart_reasons == ()
    assert older.scheduled_restart is None and older.role == MemberRole.PRIMARY


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pending_restart", "true"),
        ("pending_restart", 1),
        ("pending_restart_reasons", "max_connections"),
        ("pending_restart_reasons", ["x" * 65]),
        ("pending_restart_reasons", ["p"] * 65),
        ("scheduled_restart", -1),
        ("scheduled_restart", 1e12),
    ],
)
def test_malformed_pending_fields_are_refused(field: str, value: object) -> None:
    raw = json.loads(record(probe()).to_json())
    raw[field] = value
    with pytest.raises(InvalidRecord, match=field):
        Member.parse("a", json.dumps(raw).encode())


def test_status_cluster_and_metric_show_it() -> None:
    m = record(probe("max_connections"), scheduled=1_900_000_000.0)
    snap = snapshot(m)
    st = node_status(snap)
    assert st["pending_restart"] is True and st["pending_restart_reasons"] == ["max_connections"]
    assert st["scheduled_restart"] is not None and st["scheduled_restart"].startswith("2030-03-17T")
    (doc,) = cluster_status(snap)["members"]
    assert doc["pending_restart"] is True and doc["pending_restart_reasons"] == ["max_connections"]
    assert doc["scheduled_restart"] == st["scheduled_restart"]
    metrics = HaMetrics()
    metrics.refresh(snap)
    assert metrics.pending_restart._value.get() == 1
    metrics.refresh(snapshot(record(probe())))
    assert metrics.pending_restart._value.get() == 0
    assert b"hakeeper_postgres_pending_restart 0.0" in metrics.render(snapshot(record(probe())))
