"""Strict schemas of the JSON records hakeeper keeps in etcd (:mod:`hakeeper.core.keys`).

etcd is a trust boundary: whoever can write it (an operator with ``etcdctl``, a newer or buggy
agent, an intruder) can put anything in a key.  :mod:`hakeeper.core.cluster` turns a record into
its dataclass only after it passed one of these models, so the HA policy and the API never see
a string where a number belongs, a NaN, or a timeline no PostgreSQL can have.

The rules, the same for every record:

* strict types: ``"9"`` is not a timeline, ``1`` is not ``true``; floats accept integers;
* no NaN or Infinity, and every number within what it stands for (a timeline is 1..2^32-1,
  an LSN 0..2^64-1, a port 0..65535), so a huge value cannot overflow anything downstream;
* strings bounded in length; member names as a node config allows them;
* unknown fields are ignored: a newer agent may add some during a rolling upgrade.

Bounds limit the damage but cannot prevent it: a *well-formed* fake member with timeline 99999
still makes every real replica look behind it (ineligible).  Only etcd authentication stops a
writer who knows the schema (docs/deployment.md).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from hakeeper.core.config import _NAME_RE

__all__ = [
    "HistoryItem",
    "InvalidRecord",
    "MemberRecord",
    "StatusRecord",
    "SwitchoverRecord",
    "SyncRecord",
    "check_name",
    "describe",
    "parse_history_items",
    "parse_model",
]

U64_MAX = 2**64 - 1
TIMELINE_MAX = 2**32 - 1  # PostgreSQL's TimeLineID is a uint32
PRIORITY_MAX = 2**31 - 1
MAX_NAMES = 1000  # members of one cluster, far beyond any real one
MAX_HISTORY = 100_000
MAX_PENDING_REASONS = 64  # parameter names in a member record (the agent publishes at most 32)
MAX_REPORTED_SLOTS = 64  # slots in a member record (the agent publishes at most this many)

Text = Annotated[str, StringConstraints(max_length=1024)]
Word = Annotated[str, StringConstraints(max_length=64)]
Timeline = Annotated[int, Field(ge=1, le=TIMELINE_MAX)]
Lsn = Annotated[int, Field(ge=0, le=U64_MAX)]
Epoch = Annotated[float, Field(ge=0, le=1e11)]  # seconds; year ~5100 at most
# pydantic's (Rust) regex engine: "$" is the end of the text, no trailing newline accepted
ServerVersion = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,3}\.[0-9]{1,4}$")]
Name = Annotated[str, StringConstraints(pattern="^" + _NAME_RE.pattern + "$")]


class InvalidRecord(ValueError):
    """A record read from etcd does not validate; the message says why (for logs and the API)."""


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


class SlotRecord(_Record):
    """One replication slot of a member (:class:`hakeeper.core.slots.SlotState`)."""

    name: Annotated[str, StringConstraints(pattern="^[A-Za-z0-9_]{1,63}$")]
    type: Literal["logical", "physical"]
    failover: bool | None = None
    synced: bool | None = None
    active: bool = False
    restart_lsn: Lsn | None = None
    confirmed_flush_lsn: Lsn | None = None
    database: Word | None = None
    plugin: Word | None = None


class SlotReportRecord(_Record):
    major: Annotated[int, Field(ge=9, le=1000)]
    items: Annotated[list[SlotRecord], Field(max_length=MAX_REPORTED_SLOTS)] = []


class MemberRecord(_Record):
    """``members/<name>``: what a member publishes about itself (the name comes from the key)."""

    role: Word = "unknown"
    state: Word = "stopped"
    timeline: Timeline | None = None
    wal_lsn: Lsn | None = None
    received_lsn: Lsn | None = None
    replayed_lsn: Lsn | None = None
    lag: Lsn | None = None
    host: Annotated[str, StringConstraints(max_length=255)] = ""
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    api_url: Text = ""
    nofailover: bool = False
    failover_priority: Annotated[int, Field(ge=0, le=PRIORITY_MAX)] = 1
    noloadbalance: bool = False
    nosync: bool = False
    sync_priority: Annotated[int, Field(ge=0, le=PRIORITY_MAX)] = 1
    eligible: bool = False
    ineligible_reason: Text | None = None
    streaming_from: Text | None = None
    leaderless: bool = False
    updated_at: Epoch = 0.0
    version: Word = ""
    paused: bool | None = None
    # absent in records of agents older than these fields: nothing pending, nothing scheduled
    pending_restart: bool = False
    pending_restart_reasons: Annotated[list[Word], Field(max_length=MAX_PENDING_REASONS)] = []
    scheduled_restart: Epoch | None = None
    # the running server's release (server_version_num as "17.10"); absent in older agents'
    # records and while PostgreSQL is not running
    server_version: ServerVersion | None = None
    slots: SlotReportRecord | None = None  # absent: an agent older than slot reports


class StatusRecord(_Record):
    """``status``: the leader's last published position."""

    lsn: Lsn | None = None
    timeline: Timeline | None = None
    term: Annotated[int, Field(ge=0, le=U64_MAX)] = 0


Major = Annotated[int, Field(ge=9, le=99)]
Seconds = Annotated[float, Field(ge=0, le=1e7)]
SystemId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")]


class UpgradeSummary(_Record):
    """What a history entry says of a major upgrade (``hakeeper upgrade``)."""

    from_major: Major
    to_major: Major
    method: Word
    downtime_s: Seconds | None = None  # writes refused: the old primary's stop to the new one's start
    phases: Annotated[dict[Word, Seconds], Field(max_length=32)] = {}
    old_system_identifier: SystemId | None = None
    system_identifier: SystemId | None = None


class UpgradeRecord(_Record):
    """``upgrade``: a major upgrade in progress; while it exists no agent starts, stops or fails
    over PostgreSQL on its own (the cluster counts as paused)."""

    id: Word
    from_major: Major
    to_major: Major
    method: Word
    started_at: Epoch
    by: Text = ""
    phase: Word = "requested"


class HistoryItem(_Record):
    """One entry of ``history``."""

    timeline: Timeline
    lsn: Lsn | None
    time: Epoch
    reason: Text
    old_leader: Text | None
    new_leader: Text
    upgrade: UpgradeSummary | None = None  # set on the entry of a major upgrade


class SyncRecord(_Record):
    """``sync``: which standbys have every commit the leader of ``term`` acknowledged."""

    leader: Text
    members: Annotated[list[Name], Field(max_length=MAX_NAMES)]
    term: Annotated[int, Field(ge=0, le=U64_MAX)]
    # absent: written before quorum mode existed, reads as FIRST (all of them); -1 is how
    # SyncState writes "all of them"
    quorum: Annotated[int, Field(ge=-1, le=MAX_NAMES)] | None = None

    @model_validator(mode="after")
    def _quorum_fits(self) -> SyncRecord:
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(self.members)} members")
        return self


class SwitchoverRecord(_Record):
    """``switchover``: a pending switchover or manual failover request."""

    kind: Word
    leader: Name | None = None
    candidate: Name | None = None
    requested_at: Epoch
    scheduled_at: Epoch | None = None
    force: bool = False
    stage: Word = "requested"
    handover_at: Epoch | None = None
    allow_unsynced_slots: bool = False


_HISTORY = TypeAdapter(Annotated[list[HistoryItem], Field(max_length=MAX_HISTORY)])

M = TypeVar("M", bound=_Record)


def describe(e: ValidationError) -> str:
    """The first few problems of ``e``, one line: ``field: message; ...``."""
    parts = []
    for err in e.errors(include_url=False)[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse_model(model: type[M], raw: bytes) -> M:
    """``raw`` (JSON) validated by ``model``; :class:`InvalidRecord` with the reason."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise InvalidRecord(describe(e)) from None


def parse_history_items(raw: bytes) -> list[HistoryItem]:
    try:
        return _HISTORY.validate_json(raw)
    except ValidationError as e:
        raise InvalidRecord(describe(e)) from None


def check_name(name: str, what: str) -> None:
    """:class:`InvalidRecord` unless ``name`` is a member name a node config would accept."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidRecord(f"{what} {name[:80]!r} is not a valid member name")


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object; :class:`InvalidRecord` otherwise (for records without a model)."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidRecord(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(d).__name__}")
    return d
