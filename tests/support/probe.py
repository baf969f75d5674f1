"""Who can write, asked of every node of a LocalCluster -- without ever counting a node that could
not be asked as "not writable".

A safety assertion such as "nobody may write while etcd is down" is only as good as its probe.
A probe that swallows connection errors passes whenever a node hangs, refuses the password or
is unreachable: exactly when a dual primary would go unnoticed.  So each node is classified:

* WRITABLE: it answered, and it is not in recovery;
* READ_ONLY: it answered, and it is in recovery;
* NOT_ACCEPTING: PostgreSQL itself refused the session because it is starting up, shutting down
  or in crash recovery (no client can write there at that moment);
* STOPPED: the connection failed and no postmaster runs in its data directory, before and after
  the attempt (a stopped server cannot write);
* UNKNOWN: anything else -- the server runs but could not be asked.

:func:`writable_nodes` retries UNKNOWN nodes for a few seconds and then raises, so a check over
its answer fails instead of passing vacuously; :func:`writable_throughout` replaces "sleep, then
probe once" negative checks with probes every ~0.5 s across the whole window.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import psycopg

from hakeeper.localcluster import LocalCluster

# Messages of PostgreSQL's CANNOT_CONNECT_NOW (57P03) refusals.  libpq reports a refused startup
# without a SQLSTATE, so the text is what we have; the harness runs PostgreSQL with English
# messages (lc_messages is C in initdb's default environment).
_NOT_ACCEPTING = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
)


class Access(enum.Enum):
    WRITABLE = "writable"
    READ_ONLY = "read-only"
    NOT_ACCEPTING = "not accepting sessions"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class NodeAccess:
    name: str
    access: Access
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.access.value}" + (f" ({self.detail})" if self.detail else "")


class ProbeFailed(AssertionError):
    """A node whose PostgreSQL runs could not be asked: no safety statement can be made."""


def probe(c: LocalCluster, name: str, timeout: float = 2.0) -> NodeAccess:
    """One attempt to tell whether ``name`` accepts writes now."""
    running_before = c.postmaster_pid(name) is not None
    try:
        with psycopg.connect(c.dsn(name), connect_timeout=max(2, int(timeout)), autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if any(m in text for m in _NOT_ACCEPTING):
            return NodeAccess(name, Access.NOT_ACCEPTING, first)
        if not running_before and c.postmaster_pid(name) is None:
            return NodeAccess(name, Access.STOPPED, first)
        return NodeAccess(name, Access.UNKNOWN, first)
    if row is None:
        return NodeAccess(name, Access.UNKNOWN, "no row from pg_is_in_recovery()")
    return NodeAccess(name, Access.READ_ONLY if row[0] else Access.WRITABLE)


def probe_all(c: LocalCluster, retry_for: float = 4.0) -> dict[str, NodeAccess]:
    """Every node's access; UNKNOWN nodes are asked again for up to ``retry_for`` seconds (a
    server between two states), and :class:`ProbeFailed` is raised if one stays UNKNOWN."""
    found = {n: probe(c, n) for n in c.names}
    deadline = time.monotonic() + retry_for
    while (unknown := [n for n, a in found.items() if a.access is Access.UNKNOWN]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.3)
        for n in unknown:
            found[n] = probe(c, n)
    if unknown:
        raise ProbeFailed(
            "cannot tell whether these nodes accept writes, so no safety claim holds: "
            + "; ".join(str(found[n]) for n in unknown)
        )
    return found


def writable_nodes(c: LocalCluster) -> list[str]:
    """The nodes that accept writes now (raises :class:`ProbeFailed` if a node whose
    PostgreSQL runs could not be asked)."""
    return [n for n, a in probe_all(c).items() if a.access is Access.WRITABLE]


def writable_throughout(c: LocalCluster, expected: list[str], seconds: float, every: float = 0.5) -> int:
    """Assert that exactly ``expected`` are writable at every probe, every ``every`` seconds for
    ``seconds`` (at least two rounds).  Returns how many rounds were made."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while True:
        t0 = time.monotonic()
        found = probe_all(c)
        rounds += 1
        writable = sorted(n for n, a in found.items() if a.access is Access.WRITABLE)
        assert writable == sorted(expected), (
            f"round {rounds}: writable {writable}, expected {sorted(expected)}: "
            + "; ".join(str(a) for a in found.values())
        )
        if rounds >= 2 and time.monotonic() >= deadline:
            return rounds
        time.sleep(max(0.0, every - (time.monotonic() - t0)))


def streams_from(c: LocalCluster, replica: str, leader: str) -> bool:
    """``replica`` streams from ``leader``: seen from both ends (its WAL receiver is connected
    to the leader's port, and the leader's pg_stat_replication lists it as streaming)."""
    with psycopg.connect(c.dsn(replica), connect_timeout=2, autocommit=True) as conn:
        rx = conn.execute("SELECT status, sender_port FROM pg_stat_wal_receiver").fetchall()
    if rx != [("streaming", c.nodes[leader].pg_port)]:
        return False
    with psycopg.connect(c.dsn(leader), connect_timeout=2, autocommit=True) as conn:
        tx = conn.execute(
            "SELECT state FROM pg_stat_replication WHERE application_name = %s", (replica,)
        ).fetchall()
    return tx == [("streaming",)]
