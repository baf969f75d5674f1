"""WriteGuard: the lease and the fence together, and the one answer to "may this node write?".

The etcd lease is a promotion gate, not a fence: the fence deadline (last successful keepalive
send time + ttl - margin, :mod:`hakeeper.ha.lease`) is when this node must have stopped
accepting writes.  Two enforcers stop PostgreSQL at that deadline: :meth:`WriteGuard.watch` on
the agent's event loop, and the fencer *process* (:mod:`hakeeper.ha.fence`) when the loop stalls.
The answer to "may I write?" is computed live from the lease and the fence on every call (never
from the last HA cycle), so ``/primary`` turns 503 at the deadline itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from hakeeper.ha.fence import FenceState
from hakeeper.ha.lease import LeaseKeeper
from hakeeper.ha.state import NodeState
from hakeeper.util import clock
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.guard")

FENCE_POLL = 0.1  # seconds between two looks at the fence deadline


class Fence(Protocol):
    """What the guard needs of a fence: :class:`~hakeeper.ha.fence.FenceClient` (the handle on
    the fencer process) has it, and so does the in-memory fake the unit tests run nodes with."""

    state: FenceState

    @property
    def armed(self) -> bool: ...

    def ensure_running(self) -> None: ...

    def arm(self, deadline: float) -> None: ...

    def disarm(self) -> None: ...

    def expired(self, now: float | None = None) -> bool: ...


class WriteGuard:
    def __init__(self, name: str, lease: LeaseKeeper, fence: Fence, state: NodeState) -> None:
        self.name = name
        self.lease = lease
        self.fence = fence
        self.state = state

    # -- the fence ----------------------------------------------------------------------------------

    def on_deadline(self, deadline: float) -> None:
        """The lease moved its deadline: an armed fence follows it."""
        if self.fence.armed:
            self.fence.arm(deadline)

    def arm(self) -> None:
        """Called before anything makes PostgreSQL writable."""
        self.fence.ensure_running()
        self.fence.arm(self.lease.deadline)

    def disarm(self) -> None:
        self.fence.disarm()

    async def confirm_lease(self) -> bool:
        """A fresh keepalive: never go read-write on a lease we have not just confirmed."""
        ok = await self.lease.refresh()
        if not ok:
            log.warning("read_write_refused", reason="lease could not be confirmed with etcd")
        return ok

    async def watch(self, on_fired: Callable[[], Awaitable[None]]) -> None:
        """First-line fence: every FENCE_POLL seconds, :meth:`check`."""
        while True:
            await self.check(on_fired)
            await asyncio.sleep(FENCE_POLL)

    async def check(self, on_fired: Callable[[], Awaitable[None]]) -> bool:
        """One look at the fence: past the deadline, disarm (the fencer process need not fire
        too) and let ``on_fired`` stop PostgreSQL.  True when it fired."""
        if not self.fence.expired():
            return False
        log.error(
            "fence_fired",
            reason="leader lease not renewed before the fence deadline",
            late_by=round(clock.boottime() - self.fence.state.deadline, 3),
        )
        self.fence.disarm()
        await on_fired()
        return True

    # -- may I write? ----------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why this node may not write now (None: it may): only the running primary that holds
        the leader key under a valid lease, in its current view, whose fence is armed and has not
        expired."""
        probe = self.state.probe
        if probe is None or not probe.running:
            return "postgres is not running"
        if probe.in_recovery is not False:
            return "not a primary (in recovery)"
        leader = self.state.view.leader
        if leader is None:
            return "no leader key"
        if leader.name != self.name:
            return f"the leader key is held by {leader.name}"
        if leader.lease != self.lease.lease or not self.lease.valid():
            return "our leader lease is not valid"
        if not self.fence.armed:
            return "the fence is not armed yet"
        if self.fence.expired():
            return "fenced"
        return None

    def writable_leader(self) -> bool:
        """Lease-holding writable primary whose fence is armed and not expired (``/primary``,
        the archiver, the schedules and the heartbeat all ask :meth:`refusal`)."""
        return self.refusal() is None

    def leader_term(self) -> int | None:
        """Our term while we may write as the leader, else None."""
        leader = self.state.view.leader
        return leader.term if leader is not None and self.refusal() is None else None
