"""What a chaos run is judged on.  Pure functions over the recorded attempts (unit-tested).

Definitions (times are the runner's monotonic clock; an acknowledged write committed at some
instant between its ``send`` and its ``done``):

* **lost**: acknowledged ids missing on the final primary.
* **dual-primary window**: a *stream* is one node acknowledging writes on one timeline.  Two
  streams on different nodes overlap when each of them committed a write after the other had
  certainly committed one: ``last_send(X) > first_done(Y)`` with X on an older timeline than
  Y (the old primary still took a write after the new one had acknowledged one), or two nodes
  acknowledging on the *same* timeline at all (two promotions to one timeline id).  A clean
  failover has the old stream end before the new one begins, so there is no window.
* **timeline audit**: every acknowledged write's timeline is on the final primary's timeline
  history, and its WAL position lies before the point where that timeline was left.  (The
  position is the insert position just before the commit record, so the audit never flags a
  write that is on the history; writes straddling the switch point are caught as lost.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chaos.workload import Attempt


@dataclass(frozen=True, slots=True)
class Stream:
    node: str
    tli: int
    first_done: float
    last_send: float
    count: int


@dataclass(frozen=True, slots=True)
class DualWindow:
    old: Stream
    new: Stream
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "old": f"{self.old.node}@tl{self.old.tli}",
            "new": f"{self.new.node}@tl{self.new.tli}",
            "from": round(self.new.first_done, 3),
            "to": round(self.old.last_send, 3),
            "seconds": round(self.seconds, 3),
        }


def streams(attempts: Iterable[Attempt]) -> list[Stream]:
    acc: dict[tuple[str, int], list[Attempt]] = {}
    for a in attempts:
        if a.outcome == "ok" and a.node is not None and a.tli is not None:
            acc.setdefault((a.node, a.tli), []).append(a)
    out = [
        Stream(node, tli, min(a.done for a in xs), max(a.send for a in xs), len(xs))
        for (node, tli), xs in acc.items()
    ]
    out.sort(key=lambda s: (s.tli, s.first_done))
    return out


def dual_primary_windows(attempts: Iterable[Attempt]) -> list[DualWindow]:
    ss = streams(attempts)
    out = []
    for i, x in enumerate(ss):
        for y in ss[i + 1 :]:
            if x.node == y.node:
                continue
            if x.tli == y.tli:
                # Two nodes acknowledging on one timeline id: diverged histories, whatever the times.
                lo, hi = max(x.first_done, y.first_done), min(x.last_send, y.last_send)
                out.append(DualWindow(x, y, max(0.0, hi - lo)))
                continue
            old, new = (x, y) if x.tli < y.tli else (y, x)
            if old.last_send > new.first_done:
                out.append(DualWindow(old, new, old.last_send - new.first_done))
    return out


def lost_ids(acked: Iterable[Attempt], present: set[int]) -> list[int]:
    return sorted(a.id for a in acked if a.outcome == "ok" and a.id not in present)


def parse_history(text: str) -> dict[int, int]:
    """A timeline history file -> {parent timeline: LSN where it was left}."""
    from hakeeper.core.lsn import parse_lsn

    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            lsn = parse_lsn(parts[1])
            if lsn is not None:
                out[int(parts[0])] = lsn
    return out


@dataclass
class Audit:
    final_tli: int
    off_history: list[dict[str, Any]] = field(default_factory=list)


def timeline_audit(acked: Iterable[Attempt], final_tli: int, history: dict[int, int]) -> Audit:
    audit = Audit(final_tli)
    for a in acked:
        if a.outcome != "ok" or a.tli is None:
            continue
        if a.tli == final_tli:
            continue
        switch = history.get(a.tli)
        if switch is None or a.lsn is None or a.lsn >= switch or a.tli > final_tli:
            audit.off_history.append(
                {"id": a.id, "node": a.node, "tli": a.tli, "lsn": a.lsn, "left_at": switch}
            )
    return audit


def first_ack_after(attempts: Iterable[Attempt], t: float, src: str | None = "writer") -> float | None:
    """Seconds from ``t`` to the first acknowledgement of a write sent at or after ``t``."""
    dones = [a.done for a in attempts if a.outcome == "ok" and a.send >= t and (src is None or a.src == src)]
    return None if not dones else min(dones) - t


def longest_gap(attempts: Iterable[Attempt], src: str = "writer") -> float:
    """Longest time between consecutive acknowledgements of ``src`` (its write outage)."""
    dones = sorted(a.done for a in attempts if a.outcome == "ok" and a.src == src)
    return max((b - a for a, b in itertools.pairwise(dones)), default=0.0)


def acks_between(attempts: Iterable[Attempt], lo: float, hi: float) -> list[Attempt]:
    """Writes sent at or after ``lo`` and acknowledged before ``hi``."""
    return [a for a in attempts if a.outcome == "ok" and a.send >= lo and a.done < hi]


def lost_bytes(lost: Iterable[Attempt], history: dict[int, int]) -> int:
    """How far past its timeline's switch point the furthest lost write was (async failover's
    data loss in WAL bytes, to compare with ``maximum_lag_on_failover``)."""
    worst = 0
    for a in lost:
        switch = history.get(a.tli) if a.tli is not None else None
        if switch is not None and a.lsn is not None:
            worst = max(worst, a.lsn - switch)
    return worst


OUTAGE = 0.5  # a gap between acknowledgements shorter than this is not an outage (s)


def recovery_time(attempts: Iterable[Attempt], fault: float, src: str = "writer") -> float | None:
    """RTO: seconds from ``fault`` until ``src``'s writes flowed again after the longest outage
    the fault caused -- the end of the longest gap between acknowledgements that ends after the
    fault.  A fault that interrupted nothing (no gap of :data:`OUTAGE` or more) gives the time
    to the first acknowledgement after it."""
    dones = sorted(a.done for a in attempts if a.outcome == "ok" and a.src == src)
    before = [d for d in dones if d < fault]
    after = [d for d in dones if d >= fault]
    if not after:
        return None
    seq = before[-1:] + after
    best_end, best_gap = after[0], -1.0
    for a, b in itertools.pairwise(seq):
        if b - a > best_gap:
            best_end, best_gap = b, b - a
    if best_gap < OUTAGE:
        return after[0] - fault
    return best_end - fault
