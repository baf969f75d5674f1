"""The vocabulary of HA decisions: every :class:`Action` with its guard flags (``ACTIONS``),
the facts a node knows about itself (:class:`LocalFacts`) and a :class:`Decision`.  Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Action(StrEnum):
    """What the agent does next; ``ACTIONS`` says what each one means."""

    INITIALIZE = "initialize"
    CLONE = "clone"
    WAIT = "wait"
    START_REPLICA = "start_replica"
    FOLLOW = "follow"
    REWIND = "rewind"
    CAMPAIGN = "campaign"
    PROMOTE = "promote"
    LEAD = "lead"
    TAKEOVER = "takeover"
    START_PRIMARY = "start_primary"
    RELEASE = "release"
    DEMOTE = "demote"
    DETACH = "detach"
    SWITCHOVER = "switchover"
    REJECT_SWITCHOVER = "reject_switchover"
    DISCARD_BOOTSTRAP = "discard_bootstrap"
    FINISH_BOOTSTRAP = "finish_bootstrap"


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One row of ``ACTIONS``."""

    doc: str
    # PostgreSQL may accept writes once the action is done: its executor arms the fence.
    makes_writable: bool = False
    # The executor confirms the lease with a fresh keepalive before it acts.
    fresh_lease: bool = False
    # Carried out on the last view while etcd is unreachable: it never makes PostgreSQL writable
    # and never writes to etcd.
    safe_without_etcd: bool = False


# One row per action: what its executor does (hakeeper/ha/actions/) and its guard flags.
ACTIONS: Mapping[Action, ActionSpec] = MappingProxyType(
    {
        Action.INITIALIZE: ActionSpec(
            "race for the initialize key; the winner runs initdb (one txn creates `initialize`, "
            "`leader` and `config` together; losers delete their fresh data directory)",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.CLONE: ActionSpec(
            "pg_basebackup from the leader, through the slot it keeps for us",
        ),
        Action.WAIT: ActionSpec(
            "nothing safe to do now; `why` says what we wait for",
            safe_without_etcd=True,
        ),
        Action.START_REPLICA: ActionSpec(
            "start PostgreSQL read-only (following the leader, if any)",
            safe_without_etcd=True,
        ),
        Action.FOLLOW: ActionSpec(
            "running replica: make sure it streams from the leader (rewrite `primary_conninfo` "
            "and reload when the leader changes)",
            safe_without_etcd=True,
        ),
        Action.REWIND: ActionSpec(
            "former primary: pg_rewind from the leader (crash recovery first if needed, else "
            "re-clone), then follow",
        ),
        Action.CAMPAIGN: ActionSpec(
            "try to take the leader key (txn `create_revision == 0`); then promote if needed",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.PROMOTE: ActionSpec(
            "we hold the key but PostgreSQL is still in recovery: `pg_promote`, then record history",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.LEAD: ActionSpec(
            "we hold the key and run read-write: publish status under the term, keep one slot per member",
            makes_writable=True,
        ),
        Action.TAKEOVER: ActionSpec(
            "the key names us under an earlier lease of ours (agent restarted) or an expired one: "
            "re-attach it to our lease (same term; txn compares name, term and that old lease)",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.START_PRIMARY: ActionSpec(
            "we hold the key, PostgreSQL is down: restart in place",
            makes_writable=True,
            fresh_lease=True,
        ),
        Action.RELEASE: ActionSpec(
            "we hold the key but cannot run a primary: give it up now",
        ),
        Action.DEMOTE: ActionSpec(
            "we run read-write without the key: stop writes (immediate stop), become a replica",
            safe_without_etcd=True,
        ),
        Action.DETACH: ActionSpec(
            "synchronous/quorum mode, no leader: stop streaming from the old primary first",
        ),
        Action.SWITCHOVER: ActionSpec(
            "leader: hand over to `target` (stop writes, wait, release)",
        ),
        Action.REJECT_SWITCHOVER: ActionSpec(
            "leader: drop an impossible or stale request (the reason is logged)",
        ),
        Action.DISCARD_BOOTSTRAP: ActionSpec(
            "remove the data directory our interrupted bootstrap left (its marker proves it never "
            "became the cluster's), then start over (race again or clone)",
        ),
        Action.FINISH_BOOTSTRAP: ActionSpec(
            "we won the race before the agent was killed: create the roles (superuser password, "
            "replication role) and record the bootstrap history entry now",
            makes_writable=True,
            fresh_lease=True,
        ),
    }
)


class LeaseOwner(StrEnum):
    """Whose lease a key that names us is under, when it is not our current lease (the observe
    step asks etcd for the lease's time-to-live; the policy only reads the answer)."""

    OURS = "ours"  # one this node's agent held: earlier in this run, or persisted before a restart
    EXPIRED = "expired"  # etcd says its time-to-live has run out: nobody keeps it alive
    FOREIGN = "foreign"  # alive and never ours: another agent runs under our name
    UNKNOWN = "unknown"  # not checked (etcd did not answer)


# What an action that is not safe without etcd becomes while etcd is unreachable (the view is
# then the last one we had).
STALE_VIEW_WHY = "etcd unreachable; not acting on '{action}'"


@dataclass(frozen=True, slots=True)
class BootstrapLeft:
    """What the bootstrap marker of this node's agent says (:mod:`hakeeper.ha.bootmark`): a
    bootstrap of our data directory started and did not finish."""

    system_identifier: str | None  # what initdb made (None: killed before it was read)
    won: bool  # the initialize race was won: the data directory is the cluster's


@dataclass(frozen=True, slots=True)
class LocalFacts:
    """What the agent knows about its own node, gathered fresh before every decision."""

    name: str
    data_initialized: bool
    system_identifier: str | None = None
    pg_running: bool = False
    in_recovery: bool | None = None
    timeline: int | None = None
    wal_lsn: int | None = None
    streaming_from: str | None = None
    pg_down_for: float = 0.0  # seconds PostgreSQL has been down while it should have run
    needs_rewind: bool = False  # set after we stopped being primary, or found a primary's data
    lease: int = 0  # our etcd lease id (0: none)
    lease_valid: bool = False  # keepalive succeeded and the fence deadline is in the future
    leaderless_for: float = 0.0  # seconds since we first saw no leader key
    nofailover: bool = False
    failover_priority: int = 1
    now: float = 0.0  # wall clock (epoch s), for scheduled and stale switchover requests
    etcd_reachable: bool = True  # False: the view is the last one read before etcd went away
    # Whose lease the leader key is under when it names us under a lease other than ``lease``
    # (only asked then; fail-closed default).
    leader_lease_owner: LeaseOwner = LeaseOwner.UNKNOWN
    # Our member key is kept alive by a live lease this node never held: another agent runs
    # under our name (it started despite the check at start, e.g. both at once).
    name_conflict: bool = False
    # Our bootstrap marker, when it names our data directory: a bootstrap that did not finish.
    bootstrap_left: BootstrapLeft | None = None
    # The major of this node's PostgreSQL binaries (None: unknown, no leader's major is checked).
    binaries_major: int | None = None

    @property
    def writable(self) -> bool:
        return self.pg_running and self.in_recovery is False


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    why: str
    target: str | None = None  # the leader to clone/follow/rewind from
    facts: Mapping[str, Any] = field(default_factory=dict)
