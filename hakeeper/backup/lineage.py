"""The clusters a scope has had in one repository: the current one (the binding's system
identifier) and the earlier ones a major-version upgrade replaced (the binding's ``history``).

``pg_upgrade`` makes a new cluster (a new system identifier) of the old one's data.  Its backups
and WAL go to the same ``<scope>/`` as the old cluster's (its WAL starts on the old final
timeline + 1, so no file name is shared), and the old cluster's backups stay restorable with the
old major's binaries -- up to the old cluster's end, never past it: WAL of the new cluster
cannot be replayed on the old cluster's data.  Restore planning, ``backup list``, restore drills
and retention read this to tell the clusters apart (:class:`Lineage`).

Pure: parsing and validation of the history entries (they come from a repository: untrusted);
no I/O.  The binding object itself is read and written in :mod:`hakeeper.backup.binding`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hakeeper.core.lsn import format_lsn, parse_lsn
from hakeeper.core.timefmt import iso

BINDING_NAME = "hakeeper-cluster.json"
MAX_HISTORY = 100  # one entry per upgrade: a guard against a tampered object, not a real limit
_SYSID_RE = re.compile(r"[0-9]{1,20}")


class LineageError(ValueError):
    """The binding's history cannot be used; the message names the entry and the field."""


@dataclass(frozen=True, slots=True)
class ClusterEra:
    """An earlier cluster of the scope, replaced by a major-version upgrade."""

    system_identifier: str
    pg_major: int | None  # its PostgreSQL major (None: not known)
    until: dt.datetime  # when it was upgraded (its end)
    until_lsn: int | None  # its final checkpoint (None: not known)
    upgraded_to_major: int | None
    until_timeline: int | None = None  # its last timeline (the new cluster's WAL starts on +1)

    def to_doc(self) -> dict[str, Any]:
        return {
            "system_identifier": self.system_identifier,
            "pg_major": self.pg_major,
            "until": iso(self.until),
            "until_lsn": None if self.until_lsn is None else format_lsn(self.until_lsn),
            "upgraded_to_major": self.upgraded_to_major,
            "until_timeline": self.until_timeline,
        }

    def label(self) -> str:
        """What ``backup list`` shows for a backup of this cluster."""
        to = f" to {self.upgraded_to_major}" if self.upgraded_to_major else ""
        return f"before upgrade{to}"

    def end_text(self) -> str:
        lsn = "" if self.until_lsn is None else f", LSN {format_lsn(self.until_lsn)}"
        return f"{iso(self.until)}{lsn}"


def valid_system_identifier(value: object) -> str | None:
    """The system identifier as text if ``value`` is one (digits, as pg_control_system() shows it)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        value = str(value)
    if isinstance(value, str) and _SYSID_RE.fullmatch(value) and int(value) > 0:
        return value
    return None


def _int_field(entry: dict[str, Any], i: int, key: str, lo: int, hi: int) -> int | None:
    v = entry.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise LineageError(f"history entry {i}: {key} {v!r} is not a whole number in {lo}..{hi}")
    return v


def parse_era(entry: object, i: int) -> ClusterEra:
    """One history entry of the binding object (LineageError naming the field if unusable)."""
    if not isinstance(entry, dict):
        raise LineageError(f"history entry {i} is not an object")
    sysid = valid_system_identifier(entry.get("system_identifier"))
    if sysid is None:
        raise LineageError(
            f"history entry {i}: system_identifier {entry.get('system_identifier')!r} "
            "is not a system identifier"
        )
    raw_until = entry.get("until")
    try:
        if not isinstance(raw_until, str):
            raise ValueError
        until = dt.datetime.fromisoformat(raw_until.replace("Z", "+00:00"))
        if until.tzinfo is None:
            raise ValueError
    except ValueError:
        raise LineageError(f"history entry {i}: until {raw_until!r} is not an ISO time with a zone") from None
    raw_lsn = entry.get("until_lsn")
    until_lsn: int | None = None
    if raw_lsn is not None:
        try:
            until_lsn = parse_lsn(raw_lsn) if isinstance(raw_lsn, str) else None
        except ValueError:
            until_lsn = None
        if until_lsn is None:
            raise LineageError(f"history entry {i}: until_lsn {raw_lsn!r} is not an LSN (like 0/3000028)")
    pg_major = _int_field(entry, i, "pg_major", 9, 99)
    to_major = _int_field(entry, i, "upgraded_to_major", 9, 99)
    if pg_major is not None and to_major is not None and to_major <= pg_major:
        raise LineageError(
            f"history entry {i}: upgraded_to_major {to_major} is not newer than pg_major {pg_major}"
        )
    tli = _int_field(entry, i, "until_timeline", 1, 0xFFFFFFFE)
    return ClusterEra(sysid, pg_major, until.astimezone(dt.UTC), until_lsn, to_major, tli)


def parse_history(raw: object, current: str) -> tuple[ClusterEra, ...]:
    """The ``history`` list of a binding object bound to ``current`` (absent: no upgrade yet)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise LineageError("history is not a list")
    if len(raw) > MAX_HISTORY:
        raise LineageError(f"history has {len(raw)} entries (more than {MAX_HISTORY})")
    eras = tuple(parse_era(e, i) for i, e in enumerate(raw))
    seen: set[str] = set()
    for i, e in enumerate(eras):
        if e.system_identifier == current:
            raise LineageError(
                f"history entry {i} is the current cluster ({current}): a cluster cannot precede itself"
            )
        if e.system_identifier in seen:
            raise LineageError(f"history entry {i}: system identifier {e.system_identifier} appears twice")
        seen.add(e.system_identifier)
    return eras


@dataclass(frozen=True, slots=True)
class Lineage:
    """The scope's clusters in one repository, as its binding says."""

    current: str | None = None  # the bound system identifier (None: unbound)
    earlier: tuple[ClusterEra, ...] = ()

    def era_of(self, system_identifier: str | None) -> ClusterEra | None:
        """The earlier cluster ``system_identifier`` names (None: the current one, or unknown)."""
        if system_identifier is None:
            return None
        for e in self.earlier:
            if e.system_identifier == system_identifier:
                return e
        return None

    def is_current(self, system_identifier: str | None) -> bool:
        """A backup of the current cluster (a record without a system identifier, or a
        repository without a binding: nothing says otherwise, so it counts as current)."""
        return self.current is None or system_identifier is None or system_identifier == self.current

    def cluster_label(self, system_identifier: str | None) -> str:
        """``current``, ``before upgrade to 18``, or ``other (<sysid>)`` for a backup of a
        cluster the binding does not know (a re-created cluster's leftovers)."""
        era = self.era_of(system_identifier)
        if era is not None:
            return era.label()
        if self.is_current(system_identifier):
            return "current"
        return f"other ({system_identifier})"

    def first_timelines(self) -> set[int]:
        """Timelines a cluster began on after an upgrade: they have no ancestors (a missing
        history file of one of them is no gap)."""
        return {e.until_timeline + 1 for e in self.earlier if e.until_timeline is not None}


def era_timeline_allowed(era: ClusterEra, tli: int, hist: Sequence[tuple[int, int]]) -> bool:
    """Whether timeline ``tli`` (its history as (timeline, switch LSN) pairs) belongs to the
    earlier cluster ``era``: at most its last timeline, and (without that) no fork at or after
    its end -- a fork there is where the new cluster began."""
    if era.until_timeline is not None:
        return tli <= era.until_timeline
    if era.until_lsn is not None:
        return all(switch < era.until_lsn for _t, switch in hist)
    return True


def parse_binding_doc(raw: bytes) -> tuple[dict[str, Any], str, tuple[ClusterEra, ...]]:
    """The binding object's document, its current system identifier and its history
    (LineageError saying what is wrong)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise LineageError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise LineageError("not a JSON object")
    current = valid_system_identifier(doc.get("system_identifier"))
    if current is None:
        raise LineageError(f"system_identifier {doc.get('system_identifier')!r} is not a system identifier")
    return doc, current, parse_history(doc.get("history"), current)


def lineage_from_binding(raw: bytes) -> Lineage:
    _doc, current, earlier = parse_binding_doc(raw)
    return Lineage(current, earlier)
