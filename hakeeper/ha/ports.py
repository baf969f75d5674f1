"""The ports through which the HA agent meets the rest of the node.

``ha`` defines what it needs; other packages provide it structurally (no import of ``ha``):
:class:`BackupHooks` is implemented by :class:`hakeeper.backup.hooks.AgentBackup`, and the
composition root (:mod:`hakeeper.node`) plugs it in, or :class:`NoBackup` when the node has no
backup repository.  mypy checks the match where ``node.py`` assigns one to the other.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from hakeeper.core.cluster import Succession
from hakeeper.core.config import ParamValue
from hakeeper.core.errors import BootstrapFailed, BootstrapRefused
from hakeeper.ha.reinit import ReinitStatus
from hakeeper.ha.upgradejob import UpgradeJob


class SeededCopy(Protocol):
    """A data directory restored from a backup for a bootstrap, not yet recovered."""

    @property
    def backup_id(self) -> str: ...

    @property
    def repository(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def seconds_replay(self) -> float | None:
        """How long recovery replayed WAL (known once recovered)."""
        ...


class BackupHooks(Protocol):
    """What the HA agent asks of backup, recovery and archiving."""

    def pg_parameters(self, params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        """Parameters backup adds to ``params`` (archive_mode, archive_command, archive_timeout)."""
        ...

    async def prepare(self) -> None:
        """Before PostgreSQL can start (the archive_command script and its directories)."""
        ...

    def tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        """Tasks that run beside the HA loop and end with it (schedules, heartbeat)."""
        ...

    def lasting_tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        """Tasks that outlive PostgreSQL's stop (the archiver answers archive_command until then)."""
        ...

    def reconfigure(self) -> Sequence[Coroutine[Any, Any, None]]:
        """The node file's backup section was reloaded: follow it; returns new tasks to start
        beside the HA loop (a reload never changes repositories or archiving)."""
        ...

    def after_promotion(self, timeline: int | None) -> None: ...

    def seeds_replicas(self) -> bool:
        """Whether new replicas are filled from a backup before they stream (replica_from_backup)."""
        ...

    async def seed_replica(
        self, leader: str, system_identifier: str, timeline: int, lsn: int | None, *, delta: bool = False
    ) -> bool:
        """Fill the empty data directory from the newest backup of ``system_identifier`` on the
        history of ``timeline`` for a replica of ``leader``; False (with the reason logged) means:
        clone with pg_basebackup instead.  ``delta``: the directory holds an older copy of this
        cluster, brought to the backup by a delta restore (``hakeeper reinit --delta``)."""
        ...

    async def on_streaming(self) -> None:
        """The replica streams from its leader: drop what seeding it from a backup needed."""
        ...

    async def bootstrap_restore(self) -> SeededCopy:
        """Restore ``bootstrap.from_backup`` into the empty data directory.  Raises
        :class:`~hakeeper.core.errors.BootstrapRefused` or
        :class:`~hakeeper.core.errors.BootstrapFailed`."""
        ...

    async def bootstrap_recover(self) -> None:
        """After the initialize race was won and this node's configuration written: recover the
        copy restored last to its target, promote, and set this cluster's role passwords."""
        ...

    async def rebind_after_upgrade(self, succession: Succession) -> list[str]:
        """A major upgrade made a new cluster of this one's data: every repository is told (its
        old backups stay, of the old system identifier); the problems, one per repository."""
        ...

    async def backup_after_upgrade(self) -> dict[str, Any]:
        """A full backup of the freshly upgraded primary (this node) into every repository:
        what was taken where, or why not."""
        ...

    def status(self) -> Mapping[str, Any] | None:
        """The archiver's and heartbeat's status for ``GET /status`` (None without archiving)."""
        ...

    def refresh_metrics(self) -> None:
        """Set backup's gauges (called on every scrape of /metrics)."""
        ...

    async def close(self) -> None: ...


class NoBackup:
    """A node without backup repositories: every hook does nothing."""

    def pg_parameters(self, params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        return {}

    async def prepare(self) -> None:
        return None

    def tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        return ()

    def lasting_tasks(self) -> Sequence[Coroutine[Any, Any, None]]:
        return ()

    def reconfigure(self) -> Sequence[Coroutine[Any, Any, None]]:
        return ()

    def after_promotion(self, timeline: int | None) -> None:
        return None

    def seeds_replicas(self) -> bool:
        return False

    async def seed_replica(
        self, leader: str, system_identifier: str, timeline: int, lsn: int | None, *, delta: bool = False
    ) -> bool:
        return False

    async def on_streaming(self) -> None:
        return None

    async def bootstrap_restore(self) -> SeededCopy:
        raise BootstrapRefused("bootstrap.from_backup needs backup.repositories")

    async def bootstrap_recover(self) -> None:
        raise BootstrapFailed("no backup configured")

    async def rebind_after_upgrade(self, succession: Succession) -> list[str]:
        return []

    async def backup_after_upgrade(self) -> dict[str, Any]:
        return {"skipped": "no backup repository is configured"}

    def status(self) -> Mapping[str, Any] | None:
        return None

    def refresh_metrics(self) -> None:
        return None

    async def close(self) -> None:
        return None


class NodeOperations(Protocol):
    """What an operator may ask of this node (the API's ``POST /restart`` etc.); each answers
    with a sentence saying what was done, or raises :class:`~hakeeper.core.errors.Refused`.
    A reinitialize answers with its handle once it has started, and runs on in the background."""

    async def restart(self, *, pending_only: bool = False) -> str: ...

    async def schedule_restart(self, at: float, *, pending_only: bool = False) -> str: ...

    def cancel_scheduled_restart(self) -> str: ...

    async def reinitialize(self, *, delta: bool = False) -> ReinitStatus: ...

    def reinit_status(self) -> ReinitStatus | None:
        """The running reinitialize, else the last one (None: none since the agent started)."""
        ...

    async def reload(self) -> str: ...


class UpgradeOperations(Protocol):
    """A member's part of a major upgrade (:class:`~hakeeper.ha.upgrade.Upgrader`); each raises
    :class:`~hakeeper.core.errors.Refused` with the reason when it may not act."""

    def status(self) -> UpgradeJob | None: ...

    async def check(self, to_major: int, method: str) -> dict[str, Any]: ...

    async def upgrade_primary(self, upgrade_id: str, to_major: int, method: str) -> UpgradeJob: ...

    async def stop_replica(self, upgrade_id: str, lsn: int, timeout: float = ...) -> dict[str, Any]: ...

    async def rejoin(self, upgrade_id: str, to_major: int) -> ReinitStatus: ...
