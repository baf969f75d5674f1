"""The clock the write fence runs on.

The fence deadline (``last keepalive sent + ttl - fence_margin``) must track the time etcd counts
a lease's TTL in.  ``CLOCK_MONOTONIC`` stops while the host or VM is suspended, but etcd's TTL
runs on: a primary resumed after a suspend longer than its TTL would believe its lease still
good for ``ttl - margin`` while another node has been promoted.  ``CLOCK_BOOTTIME`` (Linux) is
the monotonic clock that also counts the time spent suspended, system-wide, so the agent and
its fencer process read the same clock.

Everything that computes or checks a fence or lease deadline calls :func:`boottime` through this
module (``clock.boottime()``), so the unit tests' virtual clock patches this one function.
"""

from __future__ import annotations

import time

__all__ = ["boottime"]

# Linux has it; elsewhere fall back to the monotonic clock (no suspend-safety there).
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: monotonic, and still running while the host is suspended."""
    return time.clock_gettime(_CLOCK)
