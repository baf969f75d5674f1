"""Per-phase throughput of a backup, a restore, a restore drill or a dump (issue 16, item 6).

A phase is a named stretch of an operation with its wall-clock seconds and, where the code can
count them honestly, the bytes it moved.  Some phases are not a stretch of their own but a split
of another phase's wall time, or run beside it: a restore's copy is one pipeline (fetch from the
repository, zstd, tar, flush), and all the code can say is how long that pipeline waited for the
repository (``fetch``) and how long for the rest (``decompress_write``).  Such a phase names the
phase it ``overlaps``; its ``rate`` is None (bytes over a wait would be a meaningless figure),
and summing only the phases without ``overlaps`` gives the operation's time.

The builders here read the timings the operations already record (``seconds_*`` fields), so that
the backup and restore code only has to call them at their end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, computed_field


class PhaseStats(BaseModel):
    """One phase: seconds of wall time, bytes moved (None: not a byte-moving phase or not
    countable), the phase it overlaps (None: a stretch of its own)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seconds: float
    bytes: int | None = None
    overlaps: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rate(self) -> float | None:
        """Bytes per second; None without bytes, without time, or for an overlapping phase."""
        if self.bytes is None or self.seconds <= 0 or self.overlaps is not None:
            return None
        return round(self.bytes / self.seconds, 1)


Phases = dict[str, PhaseStats]


def phase(seconds: float | None, nbytes: int | None = None, overlaps: str | None = None) -> PhaseStats | None:
    """A phase, or None when it did not happen (``seconds`` None)."""
    if seconds is None:
        return None
    return PhaseStats(seconds=round(max(0.0, seconds), 3), bytes=nbytes, overlaps=overlaps)


def collect(**items: PhaseStats | None) -> Phases:
    """The phases that happened, in the order given."""
    return {k: v for k, v in items.items() if v is not None}


def phases_dict(phases: Mapping[str, PhaseStats]) -> dict[str, dict[str, Any]]:
    """JSON form: ``{name: {seconds, bytes, rate, overlaps}}``."""
    return {k: v.model_dump(mode="json") for k, v in phases.items()}


def parse_phases(doc: Any) -> Phases:
    """Phases from a JSON document (a stored record, an etcd summary); unreadable entries are
    left out, never an error (records of other versions)."""
    out: Phases = {}
    if not isinstance(doc, Mapping):
        return out
    for name, v in doc.items():
        if isinstance(name, str) and isinstance(v, Mapping) and isinstance(v.get("seconds"), int | float):
            b = v.get("bytes")
            ov = v.get("overlaps")
            out[name] = PhaseStats(
                seconds=float(v["seconds"]),
                bytes=int(b) if isinstance(b, int) else None,
                overlaps=ov if isinstance(ov, str) else None,
            )
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def phase_text(name: str, ph: PhaseStats) -> str:
    """``copy 2.3 GiB in 3.1 s (742.0 MiB/s)``; an overlapping phase says what it is part of."""
    text = f"{name} " + (f"{_bytes(ph.bytes)} in " if ph.bytes is not None else "") + f"{ph.seconds:.1f} s"
    if ph.rate is not None:
        text += f" ({_bytes(ph.rate)}/s)"
    if ph.overlaps is not None:
        text += f" [within {ph.overlaps}]"
    return text


def describe(phases: Mapping[str, PhaseStats]) -> str:
    """Every phase on one line, for ``backup info``, ``restore``, ``verify`` and ``report``."""
    return "; ".join(phase_text(k, v) for k, v in phases.items())


class _Counts(Protocol):
    @property
    def skipped(self) -> str | None: ...
    @property
    def seconds(self) -> float: ...
    @property
    def bytes_counted(self) -> int: ...


class BackupTimes(Protocol):
    """What :func:`backup_phases` reads of a ``catalog.BackupRecord`` (a protocol: this module
    is imported by the catalog)."""

    @property
    def seconds_copy(self) -> float | None: ...
    @property
    def seconds_wal_wait(self) -> float | None: ...
    @property
    def size(self) -> int: ...
    @property
    def row_counts(self) -> _Counts | None: ...


class RestoreTimes(Protocol):
    """What :func:`restore_phases` reads of a ``restore.RestoreResult``."""

    @property
    def seconds_plan(self) -> float: ...
    @property
    def seconds_fetch(self) -> float: ...
    @property
    def seconds_fetch_wait(self) -> float | None: ...
    @property
    def seconds_decompress(self) -> float | None: ...
    @property
    def seconds_combine(self) -> float | None: ...
    @property
    def seconds_replay(self) -> float | None: ...
    @property
    def seconds_promote(self) -> float | None: ...
    @property
    def size(self) -> int: ...
    @property
    def stored_size(self) -> int: ...
    @property
    def replay_start_lsn(self) -> int | None: ...
    @property
    def replay_end_lsn(self) -> int | None: ...


def backup_phases(rec: BackupTimes) -> Phases:
    """A base backup: ``copy`` (pg_basebackup's stream read, compressed and uploaded: one
    pipeline, so one wall time; bytes: the data directory's), ``wal_wait`` (waiting until the
    backup's WAL is archived) and ``row_counts`` (counted on the primary while the backup waits
    for its WAL: it overlaps ``wal_wait``)."""
    rc = rec.row_counts
    counted = rc is not None and not rc.skipped and rc.seconds > 0
    return collect(
        copy=phase(rec.seconds_copy, rec.size),
        wal_wait=phase(rec.seconds_wal_wait),
        row_counts=phase(rc.seconds, rc.bytes_counted, "wal_wait") if counted and rc is not None else None,
    )


def restore_phases(res: RestoreTimes) -> Phases:
    """A restore: ``plan``; ``copy`` (the whole fetch-decompress-write pipeline; bytes: the data
    directory's) split into ``fetch`` (the copy waited for the repository; bytes: what was
    fetched) and ``decompress_write`` (zstd, tar and the flush to disk); ``combine`` (a chain
    rebuilt, part of ``copy``); ``wal_replay`` (server start to the end of replay; bytes: the WAL
    replayed, from the backup's start to the last record replayed); ``end_of_recovery`` (from
    there to a writable server: the end-of-recovery checkpoint, or the promotion at a target)."""
    replayed = None
    if res.replay_start_lsn is not None and res.replay_end_lsn is not None:
        replayed = max(0, res.replay_end_lsn - res.replay_start_lsn)
    return collect(
        plan=phase(res.seconds_plan),
        copy=phase(res.seconds_fetch, res.size),
        fetch=phase(res.seconds_fetch_wait, res.stored_size or None, "copy"),
        decompress_write=phase(res.seconds_decompress, res.size, "copy"),
        combine=phase(res.seconds_combine, None, "copy"),
        wal_replay=phase(res.seconds_replay, replayed),
        end_of_recovery=phase(res.seconds_promote),
    )


__all__ = [
    "BackupTimes",
    "PhaseStats",
    "Phases",
    "RestoreTimes",
    "backup_phases",
    "collect",
    "describe",
    "parse_phases",
    "phase",
    "phase_text",
    "phases_dict",
    "restore_phases",
]
