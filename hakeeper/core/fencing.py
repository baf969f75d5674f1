"""The fencer's timing, and the smallest ``fence_margin`` it can honour.  Pure data.

The primary must have stopped writing before its lease can expire in etcd.  From the fence
deadline on, the fencer process needs up to one poll to notice it, then up to the grace it gives
PostgreSQL's immediate shutdown (SIGQUIT) before it kills every process (SIGKILL); and the
deadline itself was moved by a keepalive that may have taken up to the etcd request timeout.
``fence_margin`` (deadline to earliest expiry) must cover all three, or the config admits a
window where the old primary still writes after another node could have been promoted.
"""

from __future__ import annotations

FENCER_POLL = 0.05  # s between two looks of the fencer process at its deadline
FENCER_KILL_GRACE = 1.0  # s from SIGQUIT (immediate shutdown) to SIGKILL
# The shortest timeout a keepalive is ever given (s).  The agent caps a keepalive's timeout at
# ``fence_margin - FENCER_POLL - FENCER_KILL_GRACE`` (but never below this), so a cluster-wide
# fence_margin changed in etcd still covers the keepalive on every node.
MIN_KEEPALIVE_TIMEOUT = 0.2


def min_fence_margin(request_timeout: float) -> float:
    """The smallest ``fence_margin`` (s) safe with an etcd ``request_timeout`` (s)."""
    return round(FENCER_POLL + FENCER_KILL_GRACE + request_timeout, 6)


def keepalive_timeout(margin: float, interval: float, request_timeout: float) -> float:
    """The timeout of one keepalive (s): within the keepalive interval (a later answer is late
    anyway), the etcd request timeout, and what ``margin`` leaves after the fencer's poll and
    grace; never below MIN_KEEPALIVE_TIMEOUT."""
    room = margin - FENCER_POLL - FENCER_KILL_GRACE
    return max(MIN_KEEPALIVE_TIMEOUT, min(interval, request_timeout, room))
