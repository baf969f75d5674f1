"""The archiver's Prometheus metrics (names and labels are part of the interface: dashboards and
the backup report read them) and the latency summary of ``status()``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hakeeper.backup.archive.spool import SpoolQueue
from hakeeper.backup.archive.state import ReadyFile, RepoState

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)


class ArchiveMetrics:
    """Every ``hakeeper_archive_*`` metric, registered in one registry."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "hakeeper_archive_last_success_timestamp_seconds",
            "Unix time of the last WAL file stored in each repository",
            ["repo"],
            registry=r,
        )
        self.pending = Gauge(
            "hakeeper_archive_pending_files", "WAL files ready in pg_wal and not yet archived", registry=r
        )
        self.ready_bytes = Gauge(
            "hakeeper_archive_ready_bytes",
            "Bytes of the .ready WAL files in pg_wal (handed back or not)",
            registry=r,
        )
        self.failures = Counter(
            "hakeeper_archive_failures", "Failed attempts to store WAL, by repository", ["repo"], registry=r
        )
        self.files = Counter(
            "hakeeper_archive_files", "WAL files stored, by repository", ["repo"], registry=r
        )
        self.conflicts = Counter(
            "hakeeper_archive_conflicts",
            "WAL files refused by a repository holding other content under that name (quarantined)",
            ["repo"],
            registry=r,
        )
        self.queue_files = Gauge(
            "hakeeper_archive_queue_files",
            "WAL files queued for a repository that was down",
            ["repo"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            "hakeeper_archive_queue_bytes", "Bytes in the local queue (distinct files)", registry=r
        )
        self.repo_up = Gauge(
            "hakeeper_archive_repository_up", "1 while a repository takes WAL", ["repo"], registry=r
        )
        self.gap_files = Counter(
            "hakeeper_archive_gap_files",
            "WAL files recorded as missing from a repository, by reason",
            ["reason"],
            registry=r,
        )
        self.active = Gauge(
            "hakeeper_archive_active",
            "1 while this node may archive (primary holding the leader key)",
            registry=r,
        )
        self.rpo = Gauge(
            "hakeeper_archive_rpo_seconds",
            "Archive RPO per repository: age of the newest WAL durable there (now minus the time the "
            "newest segment stored with every older one became ready); on the archiving primary only",
            ["repository"],
            registry=r,
        )
        self.pg_wal_cap = Gauge(
            "hakeeper_archive_pg_wal_cap_bytes",
            "max_pg_wal_bytes in effect (NaN: no cap): beyond it unarchived WAL is given up",
            registry=r,
        )
        self.pg_wal_cap_ratio = Gauge(
            "hakeeper_archive_pg_wal_cap_ratio",
            "Bytes of .ready WAL not handed back, as a share of max_pg_wal_bytes (1: WAL is given up)",
            registry=r,
        )
        self.binding_refused = Gauge(
            "hakeeper_archive_repository_refused",
            "1 while a repository is refused because it belongs to another system identifier",
            ["repo"],
            registry=r,
        )
        self.latency = Histogram(
            "hakeeper_archive_latency_seconds",
            "From a WAL file's .ready to its hand-back to PostgreSQL (durable)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def refresh(
        self, files: Iterable[ReadyFile], repos: Mapping[str, RepoState], queue: SpoolQueue, active: bool
    ) -> None:
        """The gauges, from the archiver's state after a pass (the RPO gauge: rpo.fold_durable)."""
        ready = list(files)
        self.pending.set(sum(1 for f in ready if not f.done))
        self.ready_bytes.set(sum(f.size for f in ready))
        self.queue_bytes.set(queue.total_bytes)
        self.active.set(1 if active else 0)
        for name, rs in repos.items():
            self.queue_files.labels(name).set(len(queue.files_for(name)))
            self.repo_up.labels(name).set(1 if rs.up else 0)
            if rs.last_success_at is not None:
                self.last_success.labels(name).set(rs.last_success_at)


def latency_quantiles(
    latencies: Iterable[tuple[str, float]], qs: Sequence[float] = (0.5, 0.99)
) -> dict[str, float | None]:
    """``{"p50": s, "p99": s}`` over ``(file, seconds from .ready to hand-back)`` pairs."""
    vals = sorted(v for _, v in latencies)
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{round(q * 100):d}"
        out[key] = None if not vals else round(vals[min(len(vals) - 1, int(q * len(vals)))], 3)
    return out
