"""Prometheus metrics of one agent (its own registry, so tests can run several agents).

The HA gauges are set from a :class:`NodeSnapshot` at each scrape; other parts of the node
register their own metrics on :attr:`HaMetrics.registry` and add a refresher
(:meth:`HaMetrics.add_refresher`) that runs before each scrape."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hakeeper.ha.snapshot import NodeSnapshot

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_PHASE = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60)


class HaMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._refreshers: list[Callable[[], None]] = []
        self.primary = Gauge("hakeeper_primary", "1 on the lease-holding writable primary", registry=r)
        self.replica = Gauge("hakeeper_replica", "1 on a running replica", registry=r)
        self.postgres_running = Gauge("hakeeper_postgres_running", "1 while PostgreSQL runs", registry=r)
        self.pending_restart = Gauge(
            "hakeeper_postgres_pending_restart",
            "1 while PostgreSQL has parameter changes only a restart applies (pg_settings.pending_restart)",
            registry=r,
        )
        self.version_num = Gauge(
            "hakeeper_postgres_version_num",
            "server_version_num of the running PostgreSQL (170010 for 17.10); 0 while it is not running",
            registry=r,
        )
        self.timeline = Gauge("hakeeper_timeline", "PostgreSQL timeline", registry=r)
        self.wal_lsn = Gauge("hakeeper_wal_lsn_bytes", "WAL position (current or received)", registry=r)
        self.replica_lag_bytes = Gauge(
            "hakeeper_replica_lag_bytes", "Bytes each member is behind the leader", ["member"], registry=r
        )
        self.replica_lag_seconds = Gauge(
            "hakeeper_replica_lag_seconds",
            "Replay lag of each replica in seconds (pg_stat_replication, on the primary)",
            ["member"],
            registry=r,
        )
        self.lease_remaining = Gauge(
            "hakeeper_lease_remaining_seconds", "Seconds until the fence deadline of our lease", registry=r
        )
        self.paused = Gauge("hakeeper_paused", "1 while the cluster is paused", registry=r)
        self.switchover_pending = Gauge(
            "hakeeper_switchover_pending", "1 while a switchover or failover request is pending", registry=r
        )
        self.loop_duration = Histogram(
            "hakeeper_ha_loop_duration_seconds", "Duration of one HA cycle", buckets=_FAST, registry=r
        )
        self.etcd_latency = Histogram(
            "hakeeper_etcd_request_duration_seconds",
            "etcd request latency by gateway path and outcome",
            ["path", "outcome"],
            buckets=_FAST,
            registry=r,
        )
        self.promotions = Counter(
            "hakeeper_promotions",
            "Promotions of this node, by kind (failover, switchover)",
            ["kind"],
            registry=r,
        )
        self.phase = Histogram(
            "hakeeper_promotion_phase_seconds",
            "Duration of each phase of a promotion of this node: detect (leader lost -> noticed), "
            "elect (noticed -> leader key taken), promote (pg_promote), reconfigure (-> first "
            "replica streaming from us)",
            ["kind", "phase"],
            buckets=_PHASE,
            registry=r,
        )
        self.handovers = Counter(
            "hakeeper_switchover_handovers", "Switchovers this node handed over as the old leader", registry=r
        )
        self.fence_events = Counter(
            "hakeeper_fence_events",
            "Times this node stopped its own writes at the fence deadline",
            registry=r,
        )
        self.config_valid = Gauge(
            "hakeeper_dcs_config_valid",
            "0 while the cluster config in etcd does not validate (the last valid one is kept)",
            registry=r,
        )
        self.invalid_records = Gauge(
            "hakeeper_dcs_invalid_records", "Keys in etcd ignored because they do not validate", registry=r
        )
        self.decisions = Counter(
            "hakeeper_decisions", "HA decisions taken, by action", ["action"], registry=r
        )

    def etcd_observer(self, path: str, seconds: float, ok: bool) -> None:
        self.etcd_latency.labels(path, "ok" if ok else "error").observe(seconds)

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        self._refreshers.append(refresh)

    def refresh(self, snap: NodeSnapshot) -> None:
        """Set the gauges from the snapshot (no SQL, no etcd)."""
        st = snap.probe
        view = snap.view
        self.primary.set(1 if snap.writable else 0)
        self.replica.set(1 if st is not None and st.running and st.in_recovery else 0)
        self.postgres_running.set(1 if st is not None and st.running else 0)
        self.pending_restart.set(1 if snap.member.pending_restart else 0)
        self.timeline.set(st.timeline if st is not None and st.timeline else 0)
        self.version_num.set(_version_num(st.server_version if st is not None and st.running else None))
        self.wal_lsn.set(st.wal_lsn if st is not None and st.wal_lsn else 0)
        self.lease_remaining.set(snap.lease_remaining)
        self.paused.set(1 if view.paused else 0)
        self.switchover_pending.set(1 if view.switchover is not None else 0)
        self.config_valid.set(0 if view.config_error else 1)
        self.invalid_records.set(len(view.invalid))
        self.replica_lag_bytes.clear()
        for m in view.members.values():
            if m.lag is not None:
                self.replica_lag_bytes.labels(m.name).set(m.lag)
        self.replica_lag_seconds.clear()
        if st is not None and st.running and st.in_recovery is False:
            for r in st.replication:
                if (lag := r.replay_lag_seconds) is not None:
                    self.replica_lag_seconds.labels(r.application_name).set(lag)
        for refresh in self._refreshers:
            refresh()

    def render(self, snap: NodeSnapshot) -> bytes:
        self.refresh(snap)
        return generate_latest(self.registry)


def _version_num(text: str | None) -> int:
    """``17.10`` as server_version_num's 170010 (what alert rules compare); 0 for None."""
    if not text:
        return 0
    major, _, minor = text.partition(".")
    return int(major) * 10000 + int(minor or 0)
