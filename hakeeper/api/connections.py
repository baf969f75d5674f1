"""Which connections the API takes, and for how long: the general pool, a per-client share and
a reserve kept for health checks.

A load balancer marks a node down when its health check does not answer; if health checks
shared one pool with everyone, a client cycling slow partial requests could keep the pool full
and take every node out of the load balancer.  So:

* ``api.max_connections`` connections in the general pool, at most
  ``api.max_connections_per_client`` of them from one client address (an IPv6 /64), each of
  which must start a request within ``api.request_timeout``;
* beyond either limit, a connection goes to the **health reserve** (``api.health_reserve``
  places, :data:`RESERVE_PER_CLIENT` or a quarter of them per client, only from
  ``api.health_reserve_allowlist`` when one is set): it must send its request head within
  :data:`HEALTH_GRACE` seconds, may only ``GET``/``HEAD`` a health endpoint, and is closed
  after its one answer;
* anything else is answered 503 and closed at once.

This works with a load balancer's default check (HAProxy connects to the API port itself): no
second listener to configure.  With TLS, the client's address is known only once the handshake
is done, so handshakes count against the pool they were accepted into (bounded by
``api.request_timeout``, or :data:`HEALTH_GRACE` in the reserve) and the per-client limit applies
from the end of the handshake.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
from typing import Protocol

from aiohttp.web_protocol import RequestHandler

from hakeeper.api.auth import IPNetwork, address_in, client_key
from hakeeper.core.config import ApiConfig
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.api")

KEEPALIVE_IDLE = 30.0  # an idle keep-alive connection is closed after this long
HEALTH_GRACE = 2.0  # a reserve connection's TLS handshake and request head must arrive within this
RESERVE_PER_CLIENT = 8  # reserve places one client may hold at once (at most a quarter of it)

REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Connection: close\r\nContent-Length: 35\r\n\r\n{"error": "too many connections"}\r\n'
)


class Pool(enum.Enum):
    GENERAL = "general"
    RESERVE = "health reserve"


class Admission:
    """Counts of open connections per pool and per client, and the decisions made on them."""

    def __init__(self, cfg: ApiConfig) -> None:
        self.limit = {Pool.GENERAL: cfg.max_connections, Pool.RESERVE: cfg.health_reserve}
        self.per_client = {
            Pool.GENERAL: cfg.max_connections_per_client,
            # A quarter at most, so that one client cannot take the reserve from the others.
            Pool.RESERVE: max(1, min(RESERVE_PER_CLIENT, cfg.health_reserve // 4)),
        }
        self.reserve_sources: list[IPNetwork] = [
            ipaddress.ip_network(a, strict=False) for a in cfg.health_reserve_allowlist
        ]
        self.open = {Pool.GENERAL: 0, Pool.RESERVE: 0}
        self.clients: dict[Pool, dict[str, int]] = {Pool.GENERAL: {}, Pool.RESERVE: {}}
        self.refused: dict[str, int] = {}
        self.timed_out = 0

    @property
    def open_connections(self) -> int:
        return self.open[Pool.GENERAL] + self.open[Pool.RESERVE]

    def accept(self) -> Pool | None:
        """At accept time (the client's address not known yet): the pool that takes it."""
        for pool in (Pool.GENERAL, Pool.RESERVE):
            if self.open[pool] < self.limit[pool]:
                self.open[pool] += 1
                return pool
        self.note_refused("max_connections and health_reserve full", None)
        return None

    def place(self, pool: Pool, remote: str | None) -> tuple[Pool, str] | None:
        """Once the address is known: the pool and client key the connection now counts under,
        or None (refused, and no longer counted anywhere)."""
        key = client_key(remote)
        if pool is Pool.GENERAL and self.clients[pool].get(key, 0) >= self.per_client[pool]:
            # This client has its share: the connection may still carry a health check.
            self.open[pool] -= 1
            if self.open[Pool.RESERVE] >= self.limit[Pool.RESERVE]:
                self.note_refused("max_connections_per_client, health_reserve full", remote)
                return None
            pool = Pool.RESERVE
            self.open[pool] += 1
        if pool is Pool.RESERVE:
            why = None
            if self.reserve_sources and not address_in(remote, self.reserve_sources):
                why = "client not in health_reserve_allowlist"
            elif self.clients[pool].get(key, 0) >= self.per_client[pool]:
                why = "client holds its share of health_reserve"
            if why is not None:
                self.open[pool] -= 1
                self.note_refused(why, remote)
                return None
        self.clients[pool][key] = self.clients[pool].get(key, 0) + 1
        return pool, key

    def release(self, pool: Pool, key: str | None) -> None:
        self.open[pool] -= 1
        if key is not None:
            left = self.clients[pool].get(key, 0) - 1
            if left > 0:
                self.clients[pool][key] = left
            else:
                self.clients[pool].pop(key, None)

    def note_refused(self, reason: str, remote: str | None) -> None:
        n = self.refused.get(reason, 0) + 1
        self.refused[reason] = n
        if n == 1 or n % 1000 == 0:  # a flood must not become a log flood
            log.warning("api_connection_refused", reason=reason, remote=remote, refused=n)


class Host(Protocol):
    """What a connection needs from the server."""

    admission: Admission
    connections: dict[RequestHandler, Connection]

    @property
    def request_timeout(self) -> float: ...

    def new_handler(self) -> RequestHandler | None: ...


class Refuse(asyncio.Protocol):
    """Protocol of a connection no pool takes: a 503 and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REFUSED)
        transport.close()


class Connection(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol to count connections and enforce deadlines.

    Created at accept time (so TLS handshakes in progress count against the limit); the inner
    aiohttp handler is created once the connection (and its TLS handshake) is made and the
    client's address has a place."""

    def __init__(self, host: Host, pool: Pool) -> None:
        self.host = host
        self.pool = pool
        self.key: str | None = None
        self.health_only = pool is Pool.RESERVE
        self.inner: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.released = False
        self.timer: asyncio.TimerHandle | None = None
        self.arm(self._first_deadline())

    def _first_deadline(self) -> float:
        return min(HEALTH_GRACE, self.host.request_timeout) if self.health_only else self.host.request_timeout

    def arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def started(self) -> None:
        self.busy += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def finished(self) -> None:
        self.busy -= 1
        if self.busy == 0 and not self.released:
            self.arm(KEEPALIVE_IDLE + self.host.request_timeout)

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.host.admission.release(self.pool, self.key)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self.transport is None:
            self._release()  # the TLS handshake never completed (asyncio then never tells us)
            return
        if self.busy == 0:
            self.host.admission.timed_out += 1
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.released:
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        placed = self.host.admission.place(self.pool, remote)
        if placed is None:
            self.released = True  # place() no longer counts it
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            transport.write(REFUSED)
            transport.close()
            return
        moved = placed[0] is not self.pool
        self.pool, self.key = placed
        if moved:
            self.health_only = True
            self.arm(self._first_deadline())
        inner = self.host.new_handler()
        if inner is None:
            transport.abort()
            return
        self.transport = transport
        self.inner = inner
        self.host.connections[inner] = self
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        inner = self.inner
        if inner is not None:
            self.host.connections.pop(inner, None)
            inner.connection_lost(exc)
