"""The immutable cluster model every layer reads: members, the leader, status, history, the
sync set, switchover requests, and :func:`build_view`, which turns the keys of one etcd read
into a :class:`ClusterView` (the key layout itself is :mod:`hakeeper.core.keys`).

Everything read from etcd is untrusted input: anybody who can write etcd, a newer or buggy
agent, or a man in the middle can put anything there.  Every record is validated by a strict
pydantic model (:mod:`hakeeper.core.records`) before it becomes one of the dataclasses below; an
invalid record is *absent* from the view and listed in :attr:`ClusterView.invalid` (the agent
logs it once per revision, ``GET /cluster`` and ``hakeeper list`` show it).  What "absent" means
for safety is decided per key in :func:`build_view`."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from hakeeper.core import records
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.core.records import InvalidRecord
from hakeeper.core.slots import SlotReport


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
    # Whether the agent's last cycle saw the cluster paused: its acknowledgement of pause and
    # resume (`pause --wait` waits on it).  None: an agent too old to say.
    paused: bool | None = None
    # PostgreSQL has parameter changes only a restart applies (pg_settings.pending_restart), and
    # which ones (sorted, at most MAX_PENDING_NAMES): `hakeeper list` marks the member with '*'
    pending_restart: bool = False
    pending_restart_reasons: tuple[str, ...] = ()
    scheduled_restart: float | None = None  # wall clock of a restart the agent will do (POST /restart)
    server_version: str | None = None  # the running PostgreSQL's release ("17.10"); None: not running
    slots: SlotReport | None = None  # its replication slots (core/slots.py); None: not known
    lease: int = 0  # filled from the key, not the value

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("lease")
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, name: str, raw: bytes, lease: int = 0) -> Member:
        """The member record ``raw`` of the key ``members/<name>``; :class:`InvalidRecord` if it
        (or the name) does not validate.  A role or state this version does not know (a newer
        agent's) reads as unknown/stopped rather than making the member vanish."""
        records.check_name(name, "member name")
        rec = records.parse_model(records.MemberRecord, raw)
        kw = rec.model_dump()
        try:
            kw["role"] = MemberRole(rec.role)
        except ValueError:
            kw["role"] = MemberRole.UNKNOWN
        try:
            kw["state"] = MemberState(rec.state)
        except ValueError:
            kw["state"] = MemberState.STOPPED
        kw["pending_restart_reasons"] = tuple(rec.pending_restart_reasons)
        kw["slots"] = SlotReport.from_dict(kw["slots"]) if kw["slots"] is not None else None
        return cls(name=name, lease=lease, **kw)

    @classmethod
    def from_json(cls, name: str, raw: bytes, lease: int = 0) -> Member | None:
        """:meth:`parse`, with None for an invalid record."""
        try:
            return cls.parse(name, raw, lease)
        except InvalidRecord:
            return None

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
    def parse(cls, raw: bytes) -> Status:
        rec = records.parse_model(records.StatusRecord, raw)
        return cls(lsn=rec.lsn, timeline=rec.timeline, term=rec.term)

    @classmethod
    def from_json(cls, raw: bytes) -> Status:
        """:meth:`parse`; an invalid record reads as no status at all."""
        try:
            return cls.parse(raw)
        except InvalidRecord:
            return cls()


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    timeline: int
    lsn: int | None  # where the new timeline branched off
    time: float
    reason: str
    old_leader: str | None
    new_leader: str
    # a major upgrade's entry: from_major, to_major, method, downtime_s, phases, system identifiers
    upgrade: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["upgrade"] is None:
            del d["upgrade"]  # as before upgrades existed: older agents read it unchanged
        else:
            d["upgrade"] = dict(d["upgrade"])
        return d


def parse_history_strict(raw: bytes | None) -> tuple[HistoryEntry, ...]:
    """The ``history`` key's entries (empty for an absent or empty key); :class:`InvalidRecord`
    if it does not validate."""
    if not raw:
        return ()
    items = records.parse_history_items(raw)
    return tuple(HistoryEntry(**item.model_dump()) for item in items)


@dataclass(frozen=True, slots=True)
class Succession:
    """A major upgrade made a new cluster of the old one's data (``hakeeper upgrade``): what
    the backup repositories record of it.  ``old_end_lsn``: the end of the old cluster's
    archive (None: not known); ``old_timeline``: its last timeline (None: read the archive)."""

    old_system_identifier: str
    new_system_identifier: str
    old_major: int
    new_major: int
    upgraded_at: float
    old_end_lsn: int | None
    old_timeline: int | None = None


@dataclass(frozen=True, slots=True)
class Upgrade:
    """The ``upgrade`` key: a major upgrade in progress (:class:`records.UpgradeRecord`)."""

    id: str
    from_major: int
    to_major: int
    method: str
    started_at: float
    by: str = ""
    phase: str = "requested"
    mod_revision: int = 0

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("mod_revision")
        return json.dumps(d).encode()

    @classmethod
    def parse(cls, raw: bytes, mod_revision: int = 0) -> Upgrade:
        rec = records.parse_model(records.UpgradeRecord, raw)
        return cls(**rec.model_dump(), mod_revision=mod_revision)


def parse_history(raw: bytes | None) -> tuple[HistoryEntry, ...]:
    """:func:`parse_history_strict`; an invalid history reads as none."""
    try:
        return parse_history_strict(raw)
    except InvalidRecord:
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
    def parse(cls, raw: bytes, mod_revision: int = 0) -> SyncState:
        rec = records.parse_model(records.SyncRecord, raw)
        members = tuple(rec.members)
        quorum = len(members) if rec.quorum is None else rec.quorum
        return cls(rec.leader, members, rec.term, quorum, mod_revision)

    @classmethod
    def from_json(cls, raw: bytes, mod_revision: int = 0) -> SyncState | None:
        """:meth:`parse`, with None for an invalid record (callers that decide who may promote
        must not read None as "no guarantee": :func:`build_view` flags it, see ``sync_invalid``)."""
        try:
            return cls.parse(raw, mod_revision)
        except InvalidRecord:
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
    # The operator accepted data loss for an ineligible candidate (API allow_data_loss, CLI
    # --allow-data-loss; recorded in history).  Stored as "force" for agents of earlier versions.
    force: bool = False
    stage: SwitchoverStage = SwitchoverStage.REQUESTED
    handover_at: float | None = None
    # The operator overrode the slot switchover guard (API allow_unsynced_slots): checked again
    # when the request becomes due, so a scheduled one needs it recorded.  Agents of earlier
    # versions ignore the field.
    allow_unsynced_slots: bool = False
    mod_revision: int = 0  # filled from the key

    def to_json(self) -> bytes:
        d = asdict(self)
        d.pop("mod_revision")
        return json.dumps(d).encode()

    @classmethod
    def parse(cls, raw: bytes, mod_revision: int = 0) -> Switchover:
        rec = records.parse_model(records.SwitchoverRecord, raw)
        try:
            kind = SwitchoverKind(rec.kind)
            stage = SwitchoverStage(rec.stage)
        except ValueError as e:
            raise InvalidRecord(str(e)) from None
        return cls(
            kind=kind,
            leader=rec.leader,
            candidate=rec.candidate,
            requested_at=rec.requested_at,
            scheduled_at=rec.scheduled_at,
            force=rec.force,
            stage=stage,
            handover_at=rec.handover_at,
            allow_unsynced_slots=rec.allow_unsynced_slots,
            mod_revision=mod_revision,
        )

    @classmethod
    def from_json(cls, raw: bytes, mod_revision: int = 0) -> Switchover | None:
        """:meth:`parse`, with None for an invalid request (it is then no request at all)."""
        try:
            return cls.parse(raw, mod_revision)
        except InvalidRecord:
            return None

    def due(self, now: float) -> bool:
        return self.scheduled_at is None or self.scheduled_at <= now


@dataclass(frozen=True, slots=True)
class RecordProblem:
    """A key whose value did not validate, at the revision it was written (``mod_revision``)."""

    key: str
    revision: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A consistent snapshot of the cluster's keys at one etcd revision.

    ``config_error``: the ``config`` key did not validate and ``config`` is the fallback
    :func:`build_view` was given (the agent passes the last valid config it saw).
    ``config_ignored``: fields of the stored config this version does not know (a newer agent's),
    ignored.  ``invalid``: every key left out because it did not validate.  ``sync_invalid``:
    the ``sync`` key exists but did not validate (``sync`` is then None, which must not be read
    as "no guarantee").
    """

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
    sync_invalid: bool = False
    config_ignored: tuple[str, ...] = ()
    invalid: tuple[RecordProblem, ...] = ()
    # a major upgrade in progress (``hakeeper upgrade``); an unreadable key counts as one
    upgrade: Upgrade | None = None
    upgrade_invalid: bool = False

    @property
    def upgrading(self) -> bool:
        return self.upgrade is not None or self.upgrade_invalid

    @property
    def paused(self) -> bool:
        """No automatic start, stop or failover: paused by the operator, or a major upgrade
        drives PostgreSQL."""
        return self.config.pause or self.upgrading

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


def parse_config(raw: bytes) -> tuple[DynamicConfig, tuple[str, ...]]:
    """The stored dynamic config and the names of the fields it had that this version does not
    know.  Forward compatibility (docs/decisions.md): a field written by a newer agent during a
    rolling upgrade is ignored here, while ``PATCH /config`` still refuses unknown fields; any
    other problem is :class:`InvalidRecord`."""
    try:
        return DynamicConfig.model_validate_json(raw), ()
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if not errors or any(err["type"] != "extra_forbidden" for err in errors):
            raise InvalidRecord(records.describe(e)) from None
    doc = records.json_object(raw)  # validate_json read it, so this only repeats the parse
    ignored = []
    for err in errors:
        *path, last = err["loc"]
        node: Any = doc
        for part in path:
            node = node[part]
        node.pop(last, None)
        ignored.append(".".join(str(x) for x in err["loc"]))
    try:
        return DynamicConfig.model_validate(doc), tuple(ignored)
    except ValidationError as e:
        raise InvalidRecord(records.describe(e)) from None


def _system_identifier(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        raise InvalidRecord(f"system identifier {text[:40]!r} is not a decimal number")
    return text


def build_view(
    keys: Keys,
    kvs: Mapping[str, tuple[bytes, int, int, int]],
    revision: int,
    fallback: DynamicConfig,
    fallback_source: str = "the local bootstrap values",
) -> ClusterView:
    """Build a view from ``{full_key: (value, create_revision, mod_revision, lease)}``.

    Never raises on what etcd holds.  An invalid record is left out and listed in
    ``invalid``; per key, what that means for safety:

    * ``members/<name>``: the member is absent -- no candidate, no sync standby, not counted;
    * ``leader``: the key is *held* whatever its value says (the compare-on-create guards only
      look at its existence), so nobody campaigns while it exists; the name is kept as decoded;
    * ``initialize``: kept as read (a value that matches no local system identifier keeps every
      node from joining: the safe outcome), reported;
    * ``status``, ``history``, ``switchover``: read as absent (the state before any leader wrote
      them; the history is only advisory, the timelines members publish still count);
    * ``sync``: ``sync`` is None but ``sync_invalid`` is set: in synchronous and quorum modes
      nobody but the old leader is then promotable (``candidates.sync_refusal``), since which
      standbys have every acknowledged commit is unknown; the leader rewrites the key;
    * ``config``: ``fallback`` is used (``fallback_source`` says what it is) and
      ``config_error`` says why.
    """
    initialized = None
    config = fallback
    config_rev = 0
    config_error = None
    config_ignored: tuple[str, ...] = ()
    leader = None
    members: dict[str, Member] = {}
    status = Status()
    history: tuple[HistoryEntry, ...] = ()
    history_rev = 0
    switchover: Switchover | None = None
    sync: SyncState | None = None
    sync_invalid = False
    upgrade: Upgrade | None = None
    upgrade_invalid = False
    invalid: list[RecordProblem] = []
    for key, (value, create_rev, mod_rev, lease) in kvs.items():
        try:
            if key == keys.initialize:
                initialized = value.decode(errors="replace")
                _system_identifier(value)
            elif key == keys.config:
                config_rev = mod_rev
                try:
                    config, config_ignored = parse_config(value)
                except InvalidRecord as e:
                    config_error = (
                        f"invalid config in etcd (revision {mod_rev}), using {fallback_source}: {e}"
                    )
                    raise
            elif key == keys.leader:
                leader = Leader(value.decode(errors="replace"), create_rev, lease, mod_rev)
                records.check_name(leader.name, "leader")
            elif key.startswith(keys.members):
                name = key[len(keys.members) :]
                members[name] = Member.parse(name, value, lease)
            elif key == keys.status:
                status = Status.parse(value)
            elif key == keys.history:
                history_rev = mod_rev
                history = parse_history_strict(value)
            elif key == keys.switchover:
                switchover = Switchover.parse(value, mod_rev)
            elif key == keys.upgrade:
                upgrade_invalid = True
                upgrade = Upgrade.parse(value, mod_rev)
                upgrade_invalid = False
            elif key == keys.sync:
                sync_invalid = True
                sync = SyncState.parse(value, mod_rev)
                sync_invalid = False
        except InvalidRecord as e:
            invalid.append(RecordProblem(key, mod_rev, str(e)))
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
        sync_invalid=sync_invalid,
        upgrade=upgrade,
        upgrade_invalid=upgrade_invalid,
        config_ignored=config_ignored,
        invalid=tuple(sorted(invalid, key=lambda p: p.key)),
    )


def slot_name_for(member: str) -> str:
    """Physical slot name of a member: lower case, [a-z0-9_] only, at most 63 bytes."""
    out = "".join(c if c.isalnum() and c.isascii() else "_" for c in member.lower())
    return out[:63] or "_"


def slot_name_clash(name: str, others: Iterable[str]) -> str | None:
    """The first (sorted) other member name whose physical slot name is ``name``'s, or None.

    The mapping is not one-to-one (``db-1``, ``db.1`` and ``DB_1`` all give ``db_1``): two such
    members would share one replication slot, so the second replica's walreceiver is refused
    ("slot is active") and the leader's slot bookkeeping drops a slot still in use."""
    mine = slot_name_for(name)
    return next((o for o in sorted(others) if o != name and slot_name_for(o) == mine), None)
