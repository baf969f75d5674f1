"""leader_major_refusal: a node never clones from or follows a leader of another major."""

from __future__ import annotations

from dataclasses import replace

from hakeeper.core.cluster import MemberState
from hakeeper.core.pgtypes import LocalState, release_major
from hakeeper.ha.policy.observe import Identity, member_record
from hakeeper.ha.policy.versions import leader_major_refusal
from tests.support.builders import primary, replica, view


def test_release_major_reads_what_members_publish() -> None:
    assert release_major("17.10") == 17
    assert release_major("18.6") == 18
    assert release_major("15.18") == 15
    assert release_major("9.6") == 9
    assert release_major(None) is None
    assert release_major("banana") is None
    assert LocalState.down("x").server_major is None


def test_another_major_is_refused_with_both_versions() -> None:
    v = view(replace(primary("db1"), server_version="18.6"), leader="db1")
    assert leader_major_refusal(v, "db2", 17) == (
        "the leader db1 runs PostgreSQL 18.6, this node's binaries are PostgreSQL 17"
    )
    assert leader_major_refusal(v, "db2", 18) is None


def test_nothing_is_refused_when_a_major_is_unknown_or_we_lead() -> None:
    on18 = replace(primary("db1"), server_version="18.6")
    assert leader_major_refusal(view(on18, leader="db1"), "db2", None) is None  # our binaries unknown
    assert leader_major_refusal(view(primary("db1"), leader="db1"), "db2", 17) is None  # not published
    assert leader_major_refusal(view(on18), "db2", 17) is None  # no leader
    assert leader_major_refusal(view(on18, leader="db1"), "db1", 17) is None  # ourselves


def test_the_member_record_shows_the_refusal_as_its_ineligible_reason() -> None:
    """What the loop publishes for such a node (held = the refusal): `list` shows why."""
    v = view(replace(primary("db1"), server_version="18.6"), replica("db2"), leader="db1")
    why = leader_major_refusal(v, "db2", 17)
    me = Identity("db2", "127.0.0.1", 5432, "http://x", False, 1, False, False, 1, "1")
    m = member_record(me, probe=None, activity=None, initialized=False, view=v, now_wall=0.0, held=why)
    assert m.state == MemberState.UNINITIALIZED
    assert m.eligible is False
    assert m.ineligible_reason == why
