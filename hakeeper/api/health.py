"""Health checks for load balancers and orchestrators, answered from cached agent state only.

:class:`NodeFacts` is a snapshot of what the agent already knows (its last PostgreSQL probe,
its etcd mirror, its lease); the ``check_*`` functions are pure and answer ``(ok, reason)``.
No check runs SQL or calls etcd, so a health check costs microseconds whatever the load.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hakeeper.core.config import Tags
from hakeeper.ha.snapshot import NodeSnapshot


class QueryError(ValueError):
    """A health-check query parameter is malformed (answered with 400)."""


_SIZE_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?) ?([kKmMgGtT]i?[bB]?|[bB])?", re.ASCII)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """``'16MB'`` -> 16777216; plain numbers are bytes; units are binary (kB = 1024 bytes)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (use bytes or a number with kB, MB, GB or TB)")
    unit = (m.group(2) or "").lower()
    value = float(m.group(1)) * _UNITS[unit[:1] if unit != "b" else "b"]
    if value > 2**63:
        raise ValueError(f"size too large: {text!r}")
    return int(value)


BOOL_TAGS = tuple(n for n, f in Tags.model_fields.items() if f.annotation is bool)
INT_TAGS = tuple(n for n, f in Tags.model_fields.items() if f.annotation is int)


def parse_bool(text: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """The parsed query string of a health check."""

    lag: int | None = None
    tags: Mapping[str, bool | int] = field(default_factory=dict)


def parse_query(query: Mapping[str, str], *, allow_lag: bool) -> HealthQuery:
    """Validate ``?lag=`` and ``?tag_<name>=`` parameters; anything else is an error (a typo in
    a load balancer's check should fail loudly, not pass silently)."""
    lag: int | None = None
    tags: dict[str, bool | int] = {}
    for key, value in query.items():
        if key == "lag" and allow_lag:
            try:
                lag = parse_size(value)
            except ValueError as e:
                raise QueryError(f"invalid lag: {e}") from e
        elif key.startswith("tag_"):
            name = key[4:]
            try:
                if name in BOOL_TAGS:
                    tags[name] = parse_bool(value)
                elif name in INT_TAGS:
                    if not re.fullmatch(r"-?[0-9]{1,18}", value, re.ASCII):
                        raise ValueError(f"not an integer: {value!r}")
                    tags[name] = int(value)
                else:
                    known = ", ".join(f"tag_{t}" for t in (*BOOL_TAGS, *INT_TAGS))
                    raise QueryError(f"unknown tag {name!r} (known: {known})")
            except ValueError as e:
                if isinstance(e, QueryError):
                    raise
                raise QueryError(f"invalid {key}: {e}") from e
        else:
            allowed = "lag, tag_<name>" if allow_lag else "tag_<name>"
            raise QueryError(f"unknown query parameter {key!r} (allowed: {allowed})")
    return HealthQuery(lag=lag, tags=tags)


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the agent knows about its node right now (no I/O to build)."""

    name: str
    pg_running: bool
    in_recovery: bool | None
    streaming: bool
    writable_leader: bool
    holds_leader_key: bool
    lag: int | None  # published lag of this member (bytes behind the leader)
    tags: Mapping[str, bool | int]
    loop_age: float
    loop_limit: float
    maximum_lag_on_failover: int
    sync_standbys: tuple[str, ...] = ()  # the leader's current synchronous standbys

    @classmethod
    def from_snapshot(cls, snap: NodeSnapshot, now: float | None = None) -> NodeFacts:
        st = snap.probe
        view = snap.view
        me = view.members.get(snap.name)
        dyn = view.config
        now = time.monotonic() if now is None else now
        return cls(
            name=snap.name,
            pg_running=bool(st is not None and st.running),
            in_recovery=st.in_recovery if st is not None else None,
            streaming=bool(st is not None and st.streaming_from),
            writable_leader=snap.writable,
            holds_leader_key=snap.holds_leader_key,
            lag=me.lag if me is not None else None,
            tags=snap.tags,
            loop_age=max(0.0, now - snap.loop_heartbeat),
            loop_limit=max(float(dyn.ttl), 10 * dyn.loop_wait),
            maximum_lag_on_failover=dyn.maximum_lag_on_failover,
            sync_standbys=_sync_standbys(snap),
        )


def _sync_standbys(snap: NodeSnapshot) -> tuple[str, ...]:
    view = snap.view
    sync = view.sync
    if sync is None or view.leader is None or sync.leader != view.leader.name:
        return ()
    return tuple(sync.members)


Verdict = tuple[bool, str | None]
OK: Verdict = (True, None)


def _tags_match(f: NodeFacts, q: HealthQuery) -> Verdict:
    for name, want in q.tags.items():
        have = f.tags.get(name)
        if have != want:
            return False, f"tag {name} is {_fmt(have)}, not {_fmt(want)}"
    return OK


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def check_health(f: NodeFacts) -> Verdict:
    return OK if f.pg_running else (False, "postgres is not running")


def check_primary(f: NodeFacts, q: HealthQuery | None = None) -> Verdict:
    if not f.writable_leader:
        if f.holds_leader_key and f.pg_running and f.in_recovery is False:
            return False, "leader, but its lease is not confirmed or it is fencing (read-only)"
        return False, "not the writable leader"
    return _tags_match(f, q) if q is not None else OK


def _lag_ok(f: NodeFacts, bound: int | None) -> Verdict:
    if bound is None:
        return OK
    if f.lag is None:
        return False, "lag unknown"
    if f.lag > bound:
        return False, f"lag {f.lag} bytes exceeds {bound}"
    return OK


def check_replica(f: NodeFacts, q: HealthQuery, *, honour_noloadbalance: bool = True) -> Verdict:
    if not f.pg_running:
        return False, "postgres is not running"
    if f.in_recovery is not True:
        return False, "not a replica"
    if not f.streaming:
        return False, "replica is not streaming"
    if honour_noloadbalance and f.tags.get("noloadbalance"):
        return False, "tagged noloadbalance"
    ok, why = _lag_ok(f, q.lag)
    if not ok:
        return ok, why
    return _tags_match(f, q)


def check_read_only(f: NodeFacts, q: HealthQuery) -> Verdict:
    if f.writable_leader:
        return _tags_match(f, q)
    return check_replica(f, q)


def check_sync(f: NodeFacts, q: HealthQuery) -> Verdict:
    if not f.sync_standbys:
        return False, "no synchronous standbys are configured"
    if f.name not in f.sync_standbys:
        return False, "not a synchronous standby"
    return check_replica(f, q)


def check_async(f: NodeFacts, q: HealthQuery) -> Verdict:
    if f.name in f.sync_standbys:
        return False, "a synchronous standby"
    return check_replica(f, q)


def check_liveness(f: NodeFacts) -> Verdict:
    if f.loop_age < f.loop_limit:
        return OK
    return False, f"HA loop last ran {f.loop_age:.1f}s ago (limit {f.loop_limit:.1f}s)"


def check_readiness(f: NodeFacts, q: HealthQuery) -> Verdict:
    if f.writable_leader:
        return OK
    if f.holds_leader_key:
        return False, "leader, but not writable (lease unconfirmed or fencing)"
    bound = q.lag if q.lag is not None else f.maximum_lag_on_failover
    return check_replica(f, HealthQuery(lag=bound), honour_noloadbalance=False)
