"""Small builders for cluster views and local facts, shared by the policy tests.

``view(primary("a"), replica("b"), leader="a")`` reads like the situation it builds; every field
a test does not name takes a healthy default (streaming, timeline 1, 100 MB of WAL, lease 7).
"""

from __future__ import annotations

from hakeeper.core.cluster import ClusterView, Leader, Member, MemberRole, MemberState
from hakeeper.ha.policy.decision import LocalFacts

MB = 1024 * 1024
SYSID = "7300000000000000001"


def replica(name: str, lsn: int = 100 * MB, tl: int = 1, **kw: object) -> Member:
    return Member(
        name=name,
        role=MemberRole.REPLICA,
        state=MemberState.STREAMING,
        timeline=tl,
        wal_lsn=lsn,
        host="127.0.0.1",
        port=5432,
        **kw,  # type: ignore[arg-type]
    )


def primary(name: str, lsn: int = 100 * MB, tl: int = 1) -> Member:
    return Member(name=name, role=MemberRole.PRIMARY, state=MemberState.RUNNING, timeline=tl, wal_lsn=lsn)


def view(*members: Member, leader: str | None = None, lease: int = 7, **kw: object) -> ClusterView:
    return ClusterView(
        initialized=SYSID,
        members={m.name: m for m in members},
        leader=Leader(leader, term=42, lease=lease, mod_revision=42) if leader else None,
        **kw,  # type: ignore[arg-type]
    )


def local(name: str, **kw: object) -> LocalFacts:
    base: dict[str, object] = dict(
        name=name,
        data_initialized=True,
        system_identifier=SYSID,
        pg_running=True,
        in_recovery=True,
        timeline=1,
        wal_lsn=100 * MB,
        lease=7,
        lease_valid=True,
    )
    base.update(kw)
    return LocalFacts(**base)  # type: ignore[arg-type]
