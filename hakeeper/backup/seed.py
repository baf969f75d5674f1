"""Seeding an empty data directory from a base backup, for the agent (issue 5, item 5).

Two uses (docs/backup-bootstrap.md):

* ``bootstrap.from_backup``: the node that initializes a cluster restores a backup (possibly of
  another cluster, ``scope``) instead of running initdb, recovers to the target and promotes on
  a new timeline; then it is the new cluster's primary.
* ``backup.replica_from_backup``: a replica that needs a full copy restores the newest complete
  backup of its own cluster, then replays archived WAL and streams from the leader.

All planning, checking and copying is :func:`hakeeper.backup.restore.restore` (``start=False``),
the same code as ``hakeeper restore``.  What differs is the configuration afterwards: the
restore appends a block of settings to ``postgresql.auto.conf`` for a *standalone* copy
(``archive_mode = off``, its own port and socket, no replication).  Here that block is replaced
by one holding only what recovery needs (``restore_command``, and for a bootstrap the target,
``recovery_target_action = 'promote'`` and the timeline), under :data:`SEED_HEADER`; the agent
writes everything else as for any node, so the new primary archives into its own scope and a
seeded replica streams through its slot.  :func:`drop_seed_settings` removes the block (and the
walfetch config file) once it is no longer needed: after the promotion, or once the replica
streams (walfetch exits 200 when a repository is unreachable, which would stop a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hakeeper.backup import catalog
from hakeeper.backup.basebackup import Endpoint
from hakeeper.backup.catalog import RestoreRefused, Target
from hakeeper.backup.handover import Handover, serving
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import (
    RESTORE_SCRIPT_NAME,
    RestoreOptions,
    RestoreResult,
    _start_and_wait,
    restore,
    wal_config_path,
)
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.cluster import MemberRole
from hakeeper.core.config import FromBackupConfig, NodeConfig, parse_target_time
from hakeeper.core.keys import Keys
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.store import ClusterStore
from hakeeper.pg.conf import clean_auto_conf, quote_conf_value
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.fsutil import write_atomic
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs

if TYPE_CHECKING:
    from hakeeper.dcs.store import EtcdLike
    from hakeeper.pg.postgres import Postgres

log = get_logger(__name__)

__all__ = [
    "RestoreRefused",
    "Seeded",
    "drop_seed_settings",
    "has_seed_settings",
    "recover",
    "restore_for_bootstrap",
    "restore_for_replica",
    "set_seed_settings",
    "target_of",
]

SEED_HEADER = "# hakeeper: recovery settings of a data directory seeded from a backup (removed by the agent)"
RESTORE_HEADER = "# hakeeper restore of backup"  # what restore.restore() writes above its block
BOOTSTRAP_KEYS = (
    "restore_command",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
)
REPLICA_KEYS = ("restore_command",)
_SEED_NAMES = frozenset({*BOOTSTRAP_KEYS, "recovery_target"})
_MAX_SOCKET_PATH = 107


@dataclass
class Seeded:
    """A restored data directory: the restore's result, the repository it came from, the scope,
    and the recovery settings to put back after the agent has written its own config."""

    result: RestoreResult
    repository: RepositoryConfig
    scope: str
    settings: dict[str, str]


def target_of(fb: FromBackupConfig) -> Target:
    inclusive = not fb.exclusive
    tl = fb.target_timeline
    if fb.target_time is not None:
        return Target("time", time=parse_target_time(fb.target_time), inclusive=inclusive, timeline=tl)
    if fb.target_lsn is not None:
        return Target("lsn", lsn=parse_lsn(fb.target_lsn), inclusive=inclusive, timeline=tl)
    if fb.target_xid is not None:
        return Target("xid", xid=fb.target_xid, inclusive=inclusive, timeline=tl)
    if fb.target_name is not None:
        return Target("name", name=fb.target_name, timeline=tl)
    return Target("latest", timeline=tl)


# ============================================================================ postgresql.auto.conf


def _without_blocks(text: str) -> str:
    """auto.conf without the restore's appended block (from its header to the end) and without
    any seed settings (by name: ALTER SYSTEM rewrites the file without comments)."""
    lines = text.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(RESTORE_HEADER):
            lines = lines[:i]
            break
    lines = [ln for ln in lines if ln != SEED_HEADER]
    return clean_auto_conf("\n".join(lines), _SEED_NAMES).rstrip("\n") + "\n"


def set_seed_settings(
    data_dir: Path, ra: RunAs, settings: Mapping[str, str], *, recovery_signal: bool = False
) -> None:
    """Replace the restore's block in postgresql.auto.conf by ``settings`` (none: just remove
    it); ``recovery_signal`` creates recovery.signal (targeted archive recovery)."""
    auto = data_dir / "postgresql.auto.conf"
    try:
        text = _without_blocks(auto.read_text())
    except FileNotFoundError:
        text = "# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n"
    if settings:
        text += SEED_HEADER + "\n" + "".join(f"{k} = {quote_conf_value(v)}\n" for k, v in settings.items())
    write_atomic(auto, text, mode=0o600, run_as=ra)
    if recovery_signal:
        write_atomic(data_dir / "recovery.signal", "", mode=0o600, run_as=ra)
    _fsync_dir(data_dir)


def has_seed_settings(data_dir: Path) -> bool:
    """Whether the seed's restore script or walfetch config is still there (the block goes
    with them; recovery_end_command may already have removed the config)."""
    return (data_dir / RESTORE_SCRIPT_NAME).exists() or wal_config_path(data_dir).exists()


def drop_seed_settings(data_dir: Path, ra: RunAs) -> None:
    """Remove the seed's recovery settings and the walfetch config file (it may hold S3
    credentials, and a later backup of this node would copy it)."""
    set_seed_settings(data_dir, ra, {})
    for path in (wal_config_path(data_dir), data_dir / RESTORE_SCRIPT_NAME):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _kept(result: RestoreResult, keys: tuple[str, ...]) -> dict[str, str]:
    return {k: result.settings[k] for k in keys if k in result.settings}


# ============================================================================ checks


async def check_own_scope(cfg: NodeConfig, source_scope: str) -> None:
    """The new cluster archives into ``cfg.scope``.  From another scope: that scope must hold
    nothing in any repository (else two clusters' WAL would mix).  From the same scope (a
    cluster re-created from its own backup, promoting on a timeline above every archived one):
    its backups must all be of one system identifier."""
    for rc in cfg.backup.repositories:
        repo = make_repository(rc)
        try:
            cat = await catalog.load_catalog(repo, cfg.scope, histories=False)
        finally:
            await repo.close()
        if source_scope != cfg.scope:
            held = len(cat.records) + len(cat.orphans) + len(cat.problems)
            if held or cat.wal:
                raise RestoreRefused(
                    f"repository {rc.name} already holds {len(cat.wal)} WAL files and {held} backups "
                    f"under scope {cfg.scope!r}, where this new cluster (restored from scope "
                    f"{source_scope!r}) would archive: choose a scope that is empty in every "
                    "repository, or remove that scope's objects"
                )
        else:
            ids = sorted({r.system_identifier for r in cat.records if r.system_identifier})
            if len(ids) > 1:
                raise RestoreRefused(
                    f"repository {rc.name} holds backups of several systems under scope "
                    f"{cfg.scope!r} ({', '.join(ids)}); name the source with bootstrap.from_backup.scope "
                    "and bootstrap into an empty scope"
                )


async def source_primary(client: EtcdLike, namespace: str, scope: str) -> Endpoint | None:
    """The running primary of the source cluster, if it is registered in this etcd: the WAL
    switch that lets a time or LSN target be proven archived runs there."""
    with contextlib.suppress(Exception):
        m = await ClusterStore(client, Keys.of(namespace, scope)).leader_member()
        if m is not None and m.role == MemberRole.PRIMARY and m.host and m.port:
            return Endpoint(m.name, str(m.host), int(m.port))
    return None


def socket_usable(pg: Postgres) -> bool:
    """The agent's Unix socket (pg_hba trusts the superuser there): needed to reach a restored
    server whose roles carry the source cluster's passwords."""
    path = str(pg.socket_dir)
    return len(path) + len(f"/.s.PGSQL.{pg.port}") <= _MAX_SOCKET_PATH and '"' not in path


def _options(cfg: NodeConfig, pg: Postgres, target: Target, **kw: object) -> RestoreOptions:
    return RestoreOptions(
        data_dir=pg.data_dir,
        target=target,
        bin_dir=pg.bin_dir,
        run_as=pg.run_as,
        superuser=cfg.postgresql.superuser,
        start=False,
        port=pg.port,
        **kw,  # type: ignore[arg-type]
    )


# ============================================================================ the two restores


async def restore_for_bootstrap(
    cfg: NodeConfig, pg: Postgres, fb: FromBackupConfig, primary: Endpoint | None
) -> Seeded:
    """Check the scopes, then restore (plan, verify, copy) from the first repository that can.
    RestoreRefused: nothing was copied; RestoreError etc.: the copy failed (directory emptied)."""
    source = fb.scope or cfg.scope
    if not cfg.backup.repositories:
        raise RestoreRefused("bootstrap.from_backup needs backup.repositories")
    repos = [r for r in cfg.backup.repositories if fb.repo is None or r.name == fb.repo]
    if not repos:
        names = ", ".join(r.name for r in cfg.backup.repositories)
        raise RestoreRefused(
            f"bootstrap.from_backup.repo {fb.repo!r} is not among the repositories ({names})"
        )
    if not socket_usable(pg):
        raise RestoreRefused(f"{pg.socket_dir} is too long a path for the Unix socket the bootstrap needs")
    await check_own_scope(cfg, source)
    target = target_of(fb)
    refusals: list[str] = []
    for rc in repos:
        repo = make_repository(rc)
        opts = _options(
            cfg,
            pg,
            target,
            backup_id=fb.backup,
            primary=primary,
            switch_wal=primary is not None,
            start_timeout=fb.timeout,
            serve_wal=True,
        )
        try:
            res = await restore(repo, rc, source, opts)
        except RestoreRefused as e:
            refusals.append(f"{rc.name}: {e}")
            continue
        finally:
            await repo.close()
        return Seeded(res, rc, source, _kept(res, BOOTSTRAP_KEYS))
    raise RestoreRefused("; ".join(refusals))


async def restore_for_replica(
    cfg: NodeConfig, pg: Postgres, sysid: str, leader_tli: int, leader_lsn: int | None, *, delta: bool = False
) -> Seeded:
    """The newest complete backup of system ``sysid`` on the history of the leader's timeline,
    at most ``replica_from_backup_max_wal`` behind the leader, from the first repository that
    has one; restored without a target (the agent makes it a standby).  ``delta``: the data
    directory holds an older copy of this cluster (``hakeeper reinit --delta``), brought to the
    backup by a delta restore (backup/delta.py; refused for a backup without a file index)."""
    bound = cfg.backup.replica_from_backup_max_wal
    refusals: list[str] = []
    for rc in cfg.backup.repositories:
        repo = make_repository(rc)
        try:
            cat = await catalog.load_catalog(repo, cfg.scope)
            hist = cat.history_of(leader_tli)
            if hist is None:
                refusals.append(
                    f"{rc.name}: the history of the leader's timeline {leader_tli} is not archived"
                )
                continue
            fits = [
                b
                for b in cat.complete()
                if b.system_identifier == sysid and catalog.backup_on_path(b, leader_tli, hist) is None
            ]
            if not fits:
                refusals.append(
                    f"{rc.name}: no complete backup of system {sysid} on the history of timeline {leader_tli}"
                )
                continue
            b = fits[0]
            behind = None if leader_lsn is None else leader_lsn - b.stop_lsn_int
            if behind is not None and behind > bound:
                refusals.append(
                    f"{rc.name}: the newest backup {b.id} ends {behind} bytes of WAL before the leader "
                    f"(more than backup.replica_from_backup_max_wal = {bound})"
                )
                continue
            opts = _options(
                cfg,
                pg,
                Target("latest", timeline=leader_tli),
                backup_id=b.id,
                switch_wal=False,
                serve_wal=True,  # the agent serves the WAL until the replica streams (serve_replica_wal)
                delta=delta,
            )
            try:
                res = await restore(repo, rc, cfg.scope, opts)
            except RestoreRefused as e:
                refusals.append(f"{rc.name}: {e}")
                continue
            return Seeded(res, rc, cfg.scope, _kept(res, REPLICA_KEYS))
        finally:
            await repo.close()
    raise RestoreRefused("; ".join(refusals) or "no repository")


async def recover(cfg: NodeConfig, pg: Postgres, seeded: Seeded, timeout: float) -> RestoreResult:
    """Start the server on its recovery settings and wait until it has promoted (the same wait,
    and the same log lines on failure, as ``hakeeper restore --start``), over the agent's Unix
    socket as the superuser.  RestoreError when recovery stops or takes too long."""
    opts = _options(cfg, pg, Target("latest"), start_timeout=timeout)
    repo = make_repository(seeded.repository)
    try:
        # The agent answers the restore script's WAL requests (PostgreSQL's OS user may not be
        # able to run walfetch or read the repository).
        async with serving(pg.data_dir, repo, seeded.scope, opts.run_as) as served:
            await _start_and_wait(opts, pg.data_dir, str(pg.socket_dir), seeded.result)
    finally:
        await repo.close()
    res = seeded.result
    res.wal_requests, res.wal_prefetch_hits, res.wal_fetch_wait_s = served.stats
    log.info(
        "seed_recovery_wal",
        backup=res.backup_id,
        wal_requests=res.wal_requests,
        wal_prefetch_hits=res.wal_prefetch_hits,
        wal_fetch_wait_s=round(res.wal_fetch_wait_s, 3),
    )
    return res


@contextlib.asynccontextmanager
async def over_socket(pg: Postgres) -> AsyncIterator[None]:
    """Make ``pg``'s SQL connections use its Unix socket (trusted for the superuser) instead of
    TCP with the configured password: a restored cluster still has the source's passwords until
    create_roles has set ours."""
    await pg.session.close()
    saved = pg.session.host
    pg.session.host = str(pg.socket_dir)
    try:
        yield
    finally:
        await pg.session.close()
        pg.session.host = saved


async def serve_replica_wal(cfg: NodeConfig, pg: Postgres, seeded: Seeded) -> None:
    """Answer a seeded replica's WAL requests until cancelled (when it streams): PostgreSQL's
    OS user may not be able to run walfetch or read the repository."""
    repo = make_repository(seeded.repository)
    served: Handover | None = None
    try:
        async with serving(pg.data_dir, repo, seeded.scope, pg.run_as) as served:
            await asyncio.Event().wait()
    finally:
        await repo.close()
        if served is not None:  # cancelled once the replica streams: what recovery took, and how
            log.info(
                "seed_replica_wal_served",
                backup=seeded.result.backup_id,
                wal_requests=served.stats.requests,
                wal_prefetch_hits=served.stats.hits,
                wal_fetch_wait_s=round(served.stats.seconds_waiting, 3),
            )
