"""What a member publishes about its replication slots (``Member.slots``), read back from
etcd through :class:`hakeeper.core.records.SlotReportRecord`.  Pure data, no I/O.

A primary reports its logical slots (and whether each was created with ``failover``) and the
permanent physical slots of the dynamic config; a replica reports the logical slots it has, which
on PostgreSQL 17+ are the failover slots the slot sync worker copied from the primary (``synced``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hakeeper.core.lsn import format_lsn
from hakeeper.core.records import InvalidRecord, json_object


@dataclass(frozen=True, slots=True)
class SlotState:
    name: str
    type: str  # logical | physical
    # failover flag of a logical slot; None on a server without failover slots (before 17)
    failover: bool | None = None
    synced: bool | None = None  # 17+: copied by the slot sync worker (None before 17)
    active: bool = False
    restart_lsn: int | None = None
    confirmed_flush_lsn: int | None = None
    database: str | None = None
    plugin: str | None = None


@dataclass(frozen=True, slots=True)
class SlotReport:
    """The slots of one member's PostgreSQL, and its major version (what it can do with them)."""

    major: int
    items: tuple[SlotState, ...] = ()

    @property
    def failover_capable(self) -> bool:
        return self.major >= 17

    def get(self, name: str) -> SlotState | None:
        return next((s for s in self.items if s.name == name), None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlotReport:
        """From a validated record's ``model_dump()``."""
        return cls(int(d["major"]), tuple(SlotState(**item) for item in d.get("items", ())))


def failover_slots(report: SlotReport | None) -> list[SlotState]:
    """The logical slots of a primary's report that are meant to survive a failover."""
    if report is None:
        return []
    return [s for s in report.items if s.type == "logical" and s.failover]


def names(items: Iterable[SlotState]) -> list[str]:
    return sorted(s.name for s in items)


_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")


def managed_slots_json(slots: Iterable[str]) -> bytes:
    """The ``slots`` key: ``{"managed": [names]}``."""
    return json.dumps({"managed": sorted(slots)}).encode()


def parse_managed_slots(raw: bytes) -> frozenset[str]:
    """The names of the ``slots`` key; :class:`InvalidRecord` unless it is a list of slot names."""
    d = json_object(raw)
    managed = d.get("managed")
    if not isinstance(managed, list) or len(managed) > 1000:
        raise InvalidRecord("managed: expected a list of at most 1000 slot names")
    if not all(isinstance(n, str) and _SLOT_RE.fullmatch(n) for n in managed):
        raise InvalidRecord("managed: every entry must be a slot name ([a-z0-9_]{1,63})")
    return frozenset(managed)


def slot_summary(report: SlotReport | None, leader: SlotReport | None, *, is_leader: bool) -> str:
    """One line for ``hakeeper list``: on the leader, its logical slots and whether they survive
    a failover; on a replica, how many of the leader's failover slots it has synced."""
    if is_leader:
        if report is None:
            return ""
        logical = [s for s in report.items if s.type == "logical"]
        if not logical:
            return ""
        if not report.failover_capable:
            return f"{len(logical)} logical, not failover-safe (PG {report.major})"
        unsafe = [s for s in logical if not s.failover]
        text = f"{len(logical) - len(unsafe)} failover"
        return text + (f", {len(unsafe)} not failover-safe" if unsafe else "")
    needed = failover_slots(leader)
    if not needed:
        return ""
    synced = sum(
        1 for s in needed if report is not None and (c := report.get(s.name)) is not None and c.synced
    )
    return f"slots {synced}/{len(needed)} synced"


def report_doc(report: SlotReport | None, summary: str) -> dict[str, Any] | None:
    """A member's slots for ``GET /cluster``."""
    if report is None:
        return None
    return {
        "pg_major": report.major,
        "failover_capable": report.failover_capable,
        "summary": summary,
        "items": [
            {
                "name": s.name,
                "type": s.type,
                "failover": s.failover,
                "synced": s.synced,
                "active": s.active,
                "database": s.database,
                "plugin": s.plugin,
                "restart_lsn": format_lsn(s.restart_lsn) if s.restart_lsn is not None else None,
                "confirmed_flush_lsn": (
                    format_lsn(s.confirmed_flush_lsn) if s.confirmed_flush_lsn is not None else None
                ),
            }
            for s in report.items
        ],
    }
