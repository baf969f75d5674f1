"""What a probe of the local PostgreSQL saw, and the addresses replication uses: pure data
shared by ``pg`` (which produces it), ``ha`` (which decides on it) and ``api`` (which shows it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Role(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


def release_major(release: str | None) -> int | None:
    """The major of a release as members publish it (``server_version``: ``"17.10"`` -> 17,
    ``"9.6"`` -> 9); None for None or a text that is not one.  The one reader of that text: the
    probe writes it (:func:`hakeeper.pg.version.server_version_text`), the slot keeper and the
    policy's major check read it back here."""
    if release is None:
        return None
    head = release.partition(".")[0]
    return int(head) if head.isdigit() else None


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Whom a replica streams from (or a clone/rewind reads from)."""

    host: str
    port: int
    slot_name: str | None

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``), in the same form as :attr:`LocalState.streaming_from`."""
        return hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One row of ``pg_stat_replication``."""

    application_name: str
    state: str | None
    sync_state: str | None
    sent_lsn: int | None
    write_lsn: int | None
    flush_lsn: int | None
    replay_lsn: int | None
    replay_lag: float | None  # seconds
    client_addr: str | None = None
    reply_age: float | None = None  # seconds since the standby's last status message

    @property
    def replay_lag_seconds(self) -> float | None:
        """``replay_lag``, or 0 for a streaming standby that replayed all that was sent:
        PostgreSQL shows NULL there once the standby has caught up (after one or two status
        messages, i.e. within wal_receiver_status_interval)."""
        if self.replay_lag is not None:
            return self.replay_lag
        caught_up = (
            self.replay_lsn is not None and self.sent_lsn is not None and self.replay_lsn >= self.sent_lsn
        )
        return 0.0 if self.state == "streaming" and caught_up else None


class SlotInfo(NamedTuple):
    active: bool
    restart_lsn: int | None


@dataclass(frozen=True, slots=True)
class LocalState:
    """What one probe saw.

    ``timeline``: on a primary the timeline WAL is being written on, from
    ``pg_walfile_name(pg_current_wal_lsn())`` (exact, and current right after promotion, unlike
    ``pg_control_checkpoint()`` which lags until the next checkpoint).  On a replica, the highest
    of ``pg_stat_wal_receiver.received_tli`` (while a WAL receiver runs), the newest timeline
    history file in ``pg_wal`` (the timeline the standby follows, also after its upstream died),
    and pg_control's restartpoint and minimum-recovery timelines (lower bounds that lag).
    """

    running: bool
    in_recovery: bool | None
    timeline: int | None
    wal_lsn: int | None
    received_lsn: int | None
    replayed_lsn: int | None
    streaming_from: str | None
    replication: tuple[ReplicaInfo, ...]
    error: str | None = None
    # parameters whose new value waits for a restart (pg_settings.pending_restart), sorted
    pending_restart: tuple[str, ...] = ()
    # the server's release, "17.10" (from server_version_num, which libpq reports at connect)
    server_version: str | None = None

    @property
    def server_major(self) -> int | None:
        """The running server's major (17), None when unknown (not running)."""
        return release_major(self.server_version)

    @classmethod
    def down(cls, error: str) -> LocalState:
        return cls(False, None, None, None, None, None, None, (), error)
