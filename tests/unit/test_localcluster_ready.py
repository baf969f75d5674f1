"""When the demo counts as ready: ``ready_primary`` over node states and the nodes whose agent is gone."""

from __future__ import annotations

from hakeeper.localcluster import NodeState, ready_primary


def _states(**roles: str) -> dict[str, NodeState]:
    kinds = {
        "primary": {"in_recovery": False},
        "replica": {"in_recovery": True, "receiver_status": "streaming"},
        "catching-up": {"in_recovery": True, "receiver_status": "startup"},
        "down": {"error": "connection refused"},
    }
    return {name: NodeState(name, **kinds[role]) for name, role in roles.items()}  # type: ignore[arg-type]


def test_every_node_running_needs_one_primary_and_streaming_replicas() -> None:
    assert ready_primary(_states(node1="primary", node2="replica", node3="replica")) == "node1"
    assert ready_primary(_states(node1="primary", node2="replica", node3="catching-up")) is None
    assert ready_primary(_states(node1="primary", node2="replica", node3="down")) is None
    assert ready_primary(_states(node1="down", node2="replica", node3="replica")) is None


def test_a_node_lost_during_start_up_is_left_out() -> None:
    assert ready_primary(_states(node1="primary", node2="replica", node3="down"), ["node3"]) == "node1"
    # A killed agent's PostgreSQL may still stream: fine; the others must still be ready.
    assert ready_primary(_states(node1="primary", node2="catching-up", node3="replica"), ["node3"]) is None


def test_a_primary_without_its_agent_or_two_primaries_is_never_ready() -> None:
    # Its fencer will stop it and another node will be elected: not ready yet.
    assert ready_primary(_states(node1="primary", node2="replica", node3="replica"), ["node1"]) is None
    assert ready_primary(_states(node1="primary", node2="replica", node3="primary"), ["node3"]) is None
    assert ready_primary(_states(node1="down", node2="down"), ["node1", "node2"]) is None
