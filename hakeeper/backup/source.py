"""Which server a base backup (or a dump) is taken from, and a base backup of a node's cluster.

One choice for ``hakeeper backup create --from auto|standby|primary`` (and ``dump create``) and
the backup schedules: :func:`choose_source` picks, from a cluster view, the least lagging
streaming standby within max(``maximum_lag_on_failover``, 16 MiB) of the leader, else the
primary.  :func:`backup_node` is ``create_backup`` with what a node's config says (scope,
credentials, binaries, row counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hakeeper.backup.basebackup import BackupError, Endpoint, create_backup
from hakeeper.core.cluster import MemberRole, MemberState

if TYPE_CHECKING:
    from hakeeper.backup.catalog import BackupRecord
    from hakeeper.backup.repo import Repository
    from hakeeper.core.cluster import ClusterView
    from hakeeper.core.config import NodeConfig

MIN_LAG_BOUND = 16 << 20


class NoStandby(BackupError):
    """``standby`` was asked for and no streaming standby is within the lag bound."""


@dataclass(frozen=True, slots=True)
class SourceChoice:
    """The server to copy, the primary (for ``pg_switch_wal()``; None when the cluster has no
    running primary) and what was chosen, in words: ``standby node2 (lag 0 bytes)``,
    ``the primary node1`` or ``the primary node1 (no streaming standby)``."""

    source: Endpoint
    primary: Endpoint | None
    what: str


def choose_source(view: ClusterView, mode: str) -> SourceChoice:
    """The source for ``mode`` (auto, standby or primary) in ``view``.  Raises
    :class:`NoStandby` (``standby`` without one) or BackupError (no running primary)."""
    if mode not in ("auto", "standby", "primary"):
        raise ValueError(f"unknown source mode {mode!r}")
    leader = view.leader_member
    primary = None
    if leader is not None and leader.host and leader.role == MemberRole.PRIMARY:
        primary = Endpoint(leader.name, leader.host, leader.port)
    bound = max(view.config.maximum_lag_on_failover, MIN_LAG_BOUND)
    standbys = sorted(
        (
            m
            for m in view.members.values()
            if m.role == MemberRole.REPLICA
            and m.state == MemberState.STREAMING
            and m.host
            and m.lag is not None
            and m.lag <= bound
        ),
        key=lambda m: (m.lag or 0, m.name),
    )
    if mode != "primary" and standbys:
        m = standbys[0]
        return SourceChoice(
            Endpoint(m.name, m.host, m.port), primary, f"standby {m.name} (lag {m.lag} bytes)"
        )
    if mode == "standby":
        raise NoStandby("no streaming standby within the lag bound to back up from")
    if primary is None:
        raise BackupError("the cluster has no running primary to back up from")
    what = f"the primary {primary.name}" + (" (no streaming standby)" if mode == "auto" else "")
    return SourceChoice(primary, primary, what)


async def backup_node(
    repo: Repository, cfg: NodeConfig, choice: SourceChoice, *, bin_dir: Path, **options: Any
) -> BackupRecord:
    """``create_backup`` of ``choice`` into ``repo`` with the node config's scope, credentials
    and row counts; ``options`` are create_backup's others (label, part_size, parallel, ...)."""
    options.setdefault("row_counts", cfg.backup.row_counts)
    options.setdefault("compress_on", cfg.backup.compress_on)
    return await create_backup(
        repo,
        scope=cfg.scope,
        source=choice.source,
        primary=choice.primary,
        superuser=cfg.postgresql.superuser,
        replication=cfg.postgresql.replication,
        bin_dir=bin_dir,
        **options,
    )
