"""Throughput per phase as Prometheus gauges (issue 16, item 6; docs/monitoring.md).

Every agent exports, from what etcd holds (so any member, not only the one that ran it):

- the last restore drill that passed (``<prefix>/verify/last_success``, written by
  ``hakeeper verify`` and the ``verify`` schedules): ``kind="drill"``;
- the newest run of each backup schedule with phases per repository (the runs' details in
  ``<prefix>/schedules/<name>``): ``kind="backup"`` for base backups, ``kind="dump"`` for
  logical dumps.

Gauges, last value per (kind, repository, phase): ``hakeeper_backup_phase_seconds``,
``hakeeper_backup_phase_bytes`` (phases that move countable bytes) and
``hakeeper_backup_phase_rate_bytes_per_second`` (phases of their own with bytes; a phase that
overlaps another -- a split of a pipeline's wall time -- has no rate).  A backup taken with the
CLI by hand is in its record (``backup info``), not here: nothing in etcd says it happened.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from hakeeper.backup.phases import Phases, parse_phases

SCHEDULE_KINDS = {"full": "backup", "dump": "dump"}  # schedule kind -> the metric's kind label


def _doc(raw: bytes | str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def drill_phases(raw: bytes | str | None) -> dict[tuple[str, str], Phases]:
    """(``drill``, repository) -> phases of the drill summary ``raw`` (etcd's verify/last_success)."""
    doc = _doc(raw)
    if not isinstance(doc, Mapping) or not doc.get("ok"):
        return {}
    phases = parse_phases(doc.get("phases"))
    repo = doc.get("repository")
    return {("drill", str(repo)): phases} if phases and repo else {}


def schedule_phases(kind: str, raw: bytes | str | None) -> dict[tuple[str, str], Phases]:
    """(metric kind, repository) -> phases of the newest run of a schedule record ``raw`` that
    has them for that repository (a repository the backup was only copied to has none)."""
    label = SCHEDULE_KINDS.get(kind)
    doc = _doc(raw)
    if label is None or not isinstance(doc, Mapping) or not isinstance(doc.get("runs"), list):
        return {}
    out: dict[tuple[str, str], Phases] = {}
    for run in reversed(doc["runs"]):
        details = run.get("details") if isinstance(run, Mapping) else None
        repos = details.get("repositories") if isinstance(details, Mapping) else None
        if not isinstance(repos, Mapping):
            continue
        for name, one in repos.items():
            phases = parse_phases(one.get("phases")) if isinstance(one, Mapping) else {}
            if phases and (label, str(name)) not in out:
                out[(label, str(name))] = phases
    return out


class PhaseGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["kind", "repository", "phase"]
        self.seconds = Gauge(
            "hakeeper_backup_phase_seconds",
            "Seconds of each phase of the last backup, dump or passed restore drill (kind), by repository",
            labels,
            registry=registry,
        )
        self.bytes = Gauge(
            "hakeeper_backup_phase_bytes",
            "Bytes moved by each phase of the last backup, dump or passed restore drill",
            labels,
            registry=registry,
        )
        self.rate = Gauge(
            "hakeeper_backup_phase_rate_bytes_per_second",
            "Bytes per second of each phase of its own (not for a phase overlapping another)",
            labels,
            registry=registry,
        )

    def refresh(self, latest: Iterable[tuple[tuple[str, str], Phases]]) -> None:
        """Replace every series with ``latest`` ((kind, repository), phases)."""
        for g in (self.seconds, self.bytes, self.rate):
            g.clear()
        for (kind, repo), phases in latest:
            for name, ph in phases.items():
                self.seconds.labels(kind, repo, name).set(ph.seconds)
                if ph.bytes is not None:
                    self.bytes.labels(kind, repo, name).set(ph.bytes)
                if ph.rate is not None:
                    self.rate.labels(kind, repo, name).set(ph.rate)


__all__ = ["SCHEDULE_KINDS", "PhaseGauges", "drill_phases", "schedule_phases"]
