"""Member names whose replication slot names collide (``db-1`` and ``db.1`` both map to
``db_1``): the pure check, and the refusal at start over the simulation's etcd."""

from __future__ import annotations

import pytest

from hakeeper.core.cluster import slot_name_clash, slot_name_for
from hakeeper.ha.identity import refusal_at_start
from tests.support.sim import Sim
from tests.unit.ha.test_identity import impostor_of


def test_names_that_differ_only_in_punctuation_or_case_share_a_slot_name() -> None:
    assert slot_name_for("db-1") == slot_name_for("db.1") == slot_name_for("DB_1") == "db_1"
    assert slot_name_clash("db.1", ["db-1", "db2"]) == "db-1"
    assert slot_name_clash("DB_1", ["db.1", "db-1"]) == "db-1"  # the first, sorted: stable text


def test_distinct_slot_names_and_the_member_itself_are_no_clash() -> None:
    assert slot_name_clash("db-1", ["db-2", "db-10", "db1"]) is None  # db_2, db_10, db1
    assert slot_name_clash("db-1", ["db-1"]) is None  # our own (restarted) member key
    assert slot_name_clash("db-1", []) is None
    # Truncation to 63 bytes is part of the mapping: two long names equal in their first 63.
    long = "n" * 63
    assert slot_name_clash(long + "a", [long + "b"]) == long + "b"


@pytest.mark.parametrize(("live", "newcomer"), [("a", "A"), ("b", "B")])
async def test_an_agent_whose_slot_name_is_a_live_members_refuses_to_start(
    cluster: Sim, live: str, newcomer: str
) -> None:
    node = impostor_of(cluster, live).node  # its own PostgreSQL and lease, renamed below
    reason = await refusal_at_start(node.store, node.lease, newcomer)
    assert reason is not None
    assert f"member name {newcomer!r} maps to replication slot {live!r}" in reason
    assert f"live member {live!r}" in reason
    assert node.lease.lease == 0, "nothing granted, nothing written under the name"


async def test_a_name_with_its_own_slot_may_start(cluster: Sim) -> None:
    node = impostor_of(cluster, "a").node
    assert await refusal_at_start(node.store, node.lease, "d") is None
