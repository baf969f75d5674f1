"""The immutable cluster model every layer reads: members, the leader, status, history, the
sync set, switchover requests, and :func:`build_view`, which turns the keys of one etcd read
into a :class:`ClusterView` (the key layout itself is :mod:`hakeeper.core.keys`)."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys


class MemberRole(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"
    UNKNOWN = "unknown"


class MemberState(StrEnum):
    RUNNING = "running"  # primary accepting writes
    STREAMING = "streaming"  # replica streaming from its upstream
    IN_RECOVERY = "in recovery"  # replica running but not streaming (yet)
    STARTING = "starting"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FENCED = "fenced"
    INITIALIZING = "initializing"
    CLONING = "cloning"
    REWINDING = "rewinding"
    PROMOTING = "promoting"
    UNINITIALIZED = "uninitialized"


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    role: MemberRole = MemberRole.UNKNOWN
    state: MemberState = MemberState.STOPPED
    timeline: int | None = None
    wal_lsn: int | None = None  # primary: current WAL LSN; replica: max(received, replayed)
    received_lsn: int | None = None
    replayed_lsn: int | None = None
    lag: int | None = None  # bytes behind the leader's last published LSN
    host: str = ""
    port: int = 0
    api_url: str = ""
    nofailover: bool = False
    failover_priority: int = 1
    noloadbalance: bool = False
    nosync: bool = False
    sync_priority: int = 1
    eligible: bool = False
    ineligible_reason: str | None = None
    streaming_from: str | None = None
    # Published while the leader key was gone: the old primary had stopped (fenced or released)
    # before, so wal_lsn covers every commit this member acknowledged (quorum elections).
    leaderless: bool = False
    updated_at: float = 0.0  # wall clock, for display only
    version: str = ""
    lease: int = 0  # filled from the key, not the value

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("lease")
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes, lease: int = 0) -> Member:
        try:
            d = json.loads(raw)
        except ValueError:
            return cls(name=name, lease=lease)
        if not isinstance(d, dict):
            return cls(name=name, lease=lease)
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "lease")}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        try:
            kw["role"] = MemberRole(kw.get("role", "unknown"))
        except ValueError:
            kw["role"] = MemberRole.UNKNOWN
        try:
            kw["state"] = MemberState(kw.get("state", "stopped"))
        except ValueError:
            kw["state"] = MemberState.STOPPED
        return cls(name=name, lease=lease, **kw)

    @property
    def conn_address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Leader:
    name: str
    term: int  # create_revision of the leader key: the fencing token
    lease: int
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Status:
    lsn: int | None = None
    timeline: int | None = None
    term: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"lsn": self.lsn, "timeline": self.timeline, "term": self.term}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Status:
        try:
            d = json.loads(raw)
            return cls(lsn=d.get("lsn"), timeline=d.get("timeline"), term=int(d.get("term", 0)))
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    timeline: int
    lsn: int | None  # where the new timeline branched off
    time: float
    reason: str
    old_leader: str | None
    new_leader: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_history(raw: bytes | None) -> tuple[HistoryEntry, ...]:
    if not raw:
        return ()
    try:
        items = json.loads(raw)
        return tuple(HistoryEntry(**item) for item in items)
    except (ValueError, TypeError):
        return ()


@dataclass(frozen=True, slots=True)
class SyncState:
    """The ``sync`` key: what the leader of ``term`` guarantees about its acknowledged commits.

    Every commit acknowledged since the leader listed them is on at least ``quorum`` of
    ``members`` (``hakeeper/ha/sync.py``).  Synchronous (FIRST) mode: ``quorum ==
    len(members)``, every member has every commit; a key without ``quorum`` (written before
    quorum mode existed) reads so.  Empty ``members``: no guarantee (the leader ran async).
    """

    leader: str
    members: tuple[str, ...]
    term: int
    quorum: int = -1  # -1: all of them (FIRST mode)
    mod_revision: int = 0

    def __post_init__(self) -> None:
        if self.quorum < 0:
            object.__setattr__(self, "quorum", len(self.members))

    @property
    def is_quorum(self) -> bool:
        """A quorum (ANY k) key: fewer than all members are known to have every commit."""
        return self.quorum < len(self.members)

    def to_json(self) -> bytes:
        d = {"leader": self.leader, "members": list(self.members), "term": self.term, "quorum": self.quorum}
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, raw: bytes, mod_revision: int = 0) -> SyncState | None:
        try:
            d = json.loads(raw)
            members = tuple(str(m) for m in d["members"])
            quorum = int(d.get("quorum", len(members)))
            return cls(str(d["leader"]), members, int(d["term"]), quorum, mod_revision)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def guc_quorum(names: Collection[str], quorum: int) -> int:
    """The k the GUC waits for: ``quorum`` if it is 1..len(names), else all of them (0 = FIRST
    mode's "every name", which quorum mode reads as ANY len(names), the same rule)."""
    return quorum if 1 <= quorum <= len(names) else len(names)


class SwitchoverKind(StrEnum):
    SWITCHOVER = "switchover"  # planned: the healthy leader hands over
    FAILOVER = "failover"  # manual: promote the named candidate, with or without a leader


class SwitchoverStage(StrEnum):
    REQUESTED = "requested"  # waiting for the leader (or, without a leader, the candidate)
    HANDOVER = "handover"  # the old leader stopped writes and released the key to the candidate


@dataclass(frozen=True, slots=True)
class Switchover:
    """A request in the ``switchover`` key.  Times are wall-clock epoch seconds."""

    kind: SwitchoverKind
    leader: str | None  # who must hand over; None: a failover with no leader
    candidate: str | None  # None: the best eligible replica, chosen by the leader
    requested_at: float
    scheduled_at: float | None = None
    force: bool = False  # accept data loss / an ineligible candidate (recorded in history)
    stage: SwitchoverStage = SwitchoverStage.REQUESTED
    handover_at: float | None = None
    mod_revision: int = 0  # filled from the key

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("mod_revision")
        return json.dumps(d).encode()

    @classmethod
    def from_json(cls, raw: bytes, mod_revision: int = 0) -> Switchover | None:
        try:
            d = json.loads(raw)
            return cls(
                kind=SwitchoverKind(d["kind"]),
                leader=d.get("leader"),
                candidate=d.get("candidate"),
                requested_at=float(d["requested_at"]),
                scheduled_at=None if d.get("scheduled_at") is None else float(d["scheduled_at"]),
                force=bool(d.get("force", False)),
                stage=SwitchoverStage(d.get("stage", "requested")),
                handover_at=None if d.get("handover_at") is None else float(d["handover_at"]),
                mod_revision=mod_revision,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def due(self, now: float) -> bool:
        return self.scheduled_at is None or self.scheduled_at <= now


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A consistent snapshot of the cluster's keys at one etcd revision."""

    revision: int = 0
    initialized: str | None = None  # system identifier
    config: DynamicConfig = field(default_factory=DynamicConfig)
    config_revision: int = 0
    config_error: str | None = None
    leader: Leader | None = None
    members: Mapping[str, Member] = field(default_factory=dict)
    status: Status = field(default_factory=Status)
    history: tuple[HistoryEntry, ...] = ()
    history_revision: int = 0
    switchover: Switchover | None = None
    sync: SyncState | None = None

    @property
    def paused(self) -> bool:
        return self.config.pause

    @property
    def leader_member(self) -> Member | None:
        if self.leader is None:
            return None
        return self.members.get(self.leader.name)

    @property
    def max_timeline(self) -> int:
        tls = [m.timeline for m in self.members.values() if m.timeline is not None]
        if self.status.timeline is not None:
            tls.append(self.status.timeline)
        if self.history:
            tls.append(self.history[-1].timeline)
        return max(tls, default=0)


def build_view(
    keys: Keys, kvs: Mapping[str, tuple[bytes, int, int, int]], revision: int, fallback: DynamicConfig
) -> ClusterView:
    """Build a view from ``{full_key: (value, create_revision, mod_revision, lease)}``."""
    initialized = None
    config = fallback
    config_rev = 0
    config_error = None
    leader = None
    members: dict[str, Member] = {}
    status = Status()
    history: tuple[HistoryEntry, ...] = ()
    history_rev = 0
    switchover: Switchover | None = None
    sync: SyncState | None = None
    for key, (value, create_rev, mod_rev, lease) in kvs.items():
        if key == keys.initialize:
            initialized = value.decode(errors="replace")
        elif key == keys.config:
            config_rev = mod_rev
            try:
                config = DynamicConfig.model_validate_json(value)
            except ValidationError as e:
                config_error = f"invalid config in etcd, using local bootstrap values: {e.errors()[:3]}"
        elif key == keys.leader:
            leader = Leader(value.decode(errors="replace"), create_rev, lease, mod_rev)
        elif key.startswith(keys.members):
            name = key[len(keys.members) :]
            if name:
                members[name] = Member.from_json(name, value, lease)
        elif key == keys.status:
            status = Status.from_json(value)
        elif key == keys.history:
            history = parse_history(value)
            history_rev = mod_rev
        elif key == keys.switchover:
            switchover = Switchover.from_json(value, mod_rev)
        elif key == keys.sync:
            sync = SyncState.from_json(value, mod_rev)
    return ClusterView(
        revision=revision,
        initialized=initialized,
        config=config,
        config_revision=config_rev,
        config_error=config_error,
        leader=leader,
        members=members,
        status=status,
        history=history,
        history_revision=history_rev,
        switchover=switchover,
        sync=sync,
    )


def slot_name_for(member: str) -> str:
    """Physical slot name of a member: lower case, [a-z0-9_] only, at most 63 bytes."""
    out = "".join(c if c.isalnum() and c.isascii() else "_" for c in member.lower())
    return out[:63] or "_"
