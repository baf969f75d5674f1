"""The agent's etcd lease, kept alive on its own task (not once per HA loop).

One lease per agent carries both its member key and, while it leads, the leader key.  Every
successful keepalive moves the write deadline forward:
``deadline = boottime when the keepalive was *sent* + TTL - fence_margin`` (CLOCK_BOOTTIME, which
runs on while the host is suspended, as etcd's TTL does: :mod:`hakeeper.util.clock`).
The send time is used, not the answer time: etcd restarts its TTL count when it *receives* the
keepalive, which is after we sent it, so the deadline is always before the real expiry.

Every lease granted is persisted (:class:`LeaseFile`, in the runtime directory beside the data
directory) before anything is written under it, so that an agent restarted after a crash knows
the lease its predecessor on this node held: its member and leader keys may still live on it.  A
key that names us under a live lease this node never held belongs to another agent running under
our name (a copied node file, a cloned VM): see :mod:`hakeeper.ha.identity`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from hakeeper.core.fencing import keepalive_timeout
from hakeeper.dcs.etcd import EtcdError, EtcdUnavailable, LeaseNotFound
from hakeeper.dcs.store import EtcdLike
from hakeeper.util import clock
from hakeeper.util.log import get_logger

log = get_logger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class LeaseRecord(Protocol):
    """Where the agent keeps the id of the lease it holds, across its own restarts."""

    def load(self) -> int:
        """The lease id the previous agent of this node persisted (0: none)."""
        ...

    def save(self, lease: int) -> None: ...


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class LeaseFile:
    """The lease id in ``path`` (mode 0600), with the host's boot id.

    The boot id makes a copy of the file on another host (a VM cloned from this one's disk) or
    from before a reboot not count as ours: that host's agent is not the one that held the lease.
    (A reboot outlasts any lease's TTL, so nothing of ours can live on it then anyway.)"""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            record = json.loads(self.path.read_text())
            lease, boot = int(record["lease"]), str(record["boot_id"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("lease_record_unreadable", path=str(self.path), error=str(e))
            return 0
        if boot != _boot_id():
            log.info(
                "lease_record_ignored",
                path=str(self.path),
                reason="written before a reboot or on another host",
            )
            return 0
        return lease

    def save(self, lease: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"lease": lease, "boot_id": _boot_id()}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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
        record: LeaseRecord | None = None,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.interval = interval
        self.margin = margin
        self.on_deadline = on_deadline
        self.on_lost = on_lost
        self.lease = 0
        self.deadline = 0.0  # boottime; writes are safe only before this
        self.last_ok = 0.0  # boottime of the last successful keepalive (send time)
        self._lock = asyncio.Lock()
        self.record = record
        # Every lease this node's agent held: the one its predecessor persisted, and each granted
        # since.  Keys may still live on any of them (a mirror that lags, a crash); never on a
        # lease outside this set unless another agent put them there.
        self.own: set[int] = set()
        previous = record.load() if record is not None else 0
        if previous:
            self.own.add(previous)
        self.previous = previous

    def is_own(self, lease: int) -> bool:
        """Whether ``lease`` is one this node's agent held (now, earlier, or before a restart)."""
        return lease != 0 and (lease == self.lease or lease in self.own)

    def valid(self, now: float | None = None) -> bool:
        """``now``: a :func:`~hakeeper.util.clock.boottime` reading (default: the clock now)."""
        return self.lease != 0 and (now if now is not None else clock.boottime()) < self.deadline

    def remaining(self) -> float:
        return max(0.0, self.deadline - clock.boottime())

    async def grant(self) -> int:
        async with self._lock:
            sent = clock.boottime()
            lease = await self.client.lease_grant(self.ttl)
            self.own.add(lease)
            self._persist(lease)  # before anything is written under it (no await in between)
            self.lease = lease
            self._advance(sent, self.ttl)
            log.info("lease_granted", lease=hex(self.lease), ttl=self.ttl)
            return self.lease

    def _persist(self, lease: int) -> None:
        if self.record is None:
            return
        try:
            self.record.save(lease)
        except OSError as e:
            # Not a safety problem: a restarted agent would only refuse itself (or wait) until
            # this lease expires, as if another agent had held it.
            log.error("lease_record_failed", lease=hex(lease), error=str(e))

    def _advance(self, sent: float, ttl: int) -> None:
        self.last_ok = sent
        self.deadline = sent + ttl - self.margin
        self.on_deadline(self.deadline)

    async def refresh(self, timeout: float | None = None) -> bool:
        """One keepalive now.  True when the lease is alive and the deadline moved forward.
        ``timeout`` (default: :attr:`keepalive_timeout`) is capped at the keepalive timeout the
        fence margin covers."""
        timeout = self.keepalive_timeout if timeout is None else min(timeout, self.keepalive_timeout)
        async with self._lock:
            if self.lease == 0:
                return False
            sent = clock.boottime()
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
                    deadline_in=round(self.deadline - clock.boottime(), 2),
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
            await self.refresh()

    @property
    def client_timeout(self) -> float:
        return getattr(self.client, "timeout", 1.0)

    @property
    def keepalive_timeout(self) -> float:
        """Each keepalive must answer within the interval (or it is late anyway) and within what
        the fence margin leaves after the fencer's poll and grace (:mod:`hakeeper.core.fencing`)."""
        return keepalive_timeout(self.margin, self.interval, self.client_timeout)

    async def revoke(self) -> None:
        if self.lease:
            lease, self.lease = self.lease, 0
            self.deadline = 0.0
            try:
                await self.client.lease_revoke(lease)
            except (EtcdUnavailable, EtcdError) as e:
                log.warning("lease_revoke_failed", error=str(e))
