"""The agent's etcd lease, kept alive on its own task (not once per HA loop).

One lease per agent carries both its member key and, while it leads, the leader key.  Every
successful keepalive moves the write deadline forward:
``deadline = monotonic time the keepalive was *sent* + TTL - fence_margin``.
The send time is used, not the answer time: etcd restarts its TTL count when it *receives* the
keepalive, which is after we sent it, so the deadline is always before the real expiry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hakeeper.dcs.etcd import EtcdError, EtcdUnavailable, LeaseNotFound
from hakeeper.dcs.store import EtcdLike
from hakeeper.util.log import get_logger

log = get_logger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        client: EtcdLike,
        *,
        ttl: int,
        interval: float,
        margin: float,
        on_deadline: Callable[[float], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.interval = interval
        self.margin = margin
        self.on_deadline = on_deadline
        self.on_lost = on_lost
        self.lease = 0
        self.deadline = 0.0  # monotonic; writes are safe only before this
        self.last_ok = 0.0  # monotonic time of the last successful keepalive (send time)
        self._lock = asyncio.Lock()

    def valid(self, now: float | None = None) -> bool:
        return self.lease != 0 and (now if now is not None else time.monotonic()) < self.deadline

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def grant(self) -> int:
        async with self._lock:
            sent = time.monotonic()
            self.lease = await self.client.lease_grant(self.ttl)
            self._advance(sent, self.ttl)
            log.info("lease_granted", lease=hex(self.lease), ttl=self.ttl)
            return self.lease

    def _advance(self, sent: float, ttl: int) -> None:
        self.last_ok = sent
        self.deadline = sent + ttl - self.margin
        self.on_deadline(self.deadline)

    async def refresh(self, timeout: float | None = None) -> bool:
        """One keepalive now.  True when the lease is alive and the deadline moved forward."""
        async with self._lock:
            if self.lease == 0:
                return False
            sent = time.monotonic()
            try:
                ttl = await self.client.lease_keepalive(self.lease, timeout=timeout)
            except LeaseNotFound:
                log.warning("lease_lost", lease=hex(self.lease), reason="etcd says the lease is gone")
                self.lease = 0
                self.deadline = 0.0
                self.on_lost()
                return False
            except EtcdError as e:
                log.warning(
                    "lease_keepalive_failed",
                    lease=hex(self.lease),
                    error=str(e),
                    deadline_in=round(self.deadline - time.monotonic(), 2),
                )
                return False
            if ttl <= 0:
                self.lease = 0
                self.deadline = 0.0
                self.on_lost()
                return False
            self._advance(sent, ttl)
            return True

    async def run(self) -> None:
        """Keep the lease alive until cancelled: :meth:`renew` every ``interval``."""
        while True:
            started = time.monotonic()
            try:
                await self.renew()
            except Exception:
                # Not expected (every bad etcd reply is an EtcdError, handled in renew), but this
                # task ending would end the agent and its shutdown would stop PostgreSQL; an
                # unrenewed lease only lets the deadline run out, which the fence handles.
                log.exception("lease_task_error", lease=hex(self.lease))
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    async def renew(self) -> None:
        """One turn of :meth:`run`: grant a new lease when it is lost, else one keepalive."""
        if self.lease == 0:
            try:
                await self.grant()
            except EtcdError as e:
                log.warning("lease_grant_failed", error=str(e))
        else:
            # Each keepalive must answer well within the interval, or it is late anyway.
            await self.refresh(timeout=max(0.2, min(self.interval, self.client_timeout)))

    @property
    def client_timeout(self) -> float:
        return getattr(self.client, "timeout", 1.0)

    async def revoke(self) -> None:
        if self.lease:
            lease, self.lease = self.lease, 0
            self.deadline = 0.0
            try:
                await self.client.lease_revoke(lease)
            except (EtcdUnavailable, EtcdError) as e:
                log.warning("lease_revoke_failed", error=str(e))
