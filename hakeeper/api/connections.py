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
* when the reserve is full, its oldest connection that has not sent a request yet makes way for
  the new one: a health check sends its request at once, a slow client does not, so a flood of
  slow connections from many addresses must outpace every check's round trip to starve it
  (``api.health_reserve_allowlist`` closes the reserve to all but the load balancers);
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
        self.evicted = 0
        # Reserve connections that have not sent a request yet, oldest first: when the reserve
        # is full, the oldest of them makes way (a health check sends its request at once, a
        # slow client does not; a flood must then outpace the round trip of every check).
        self.waiting: dict[Connection, None] = {}

    @property
    def open_connections(self) -> int:
        return self.open[Pool.GENERAL] + self.open[Pool.RESERVE]

    def accept(self) -> Pool | None:
        """At accept time (the client's address not known yet): the pool that takes it."""
        if self.open[Pool.GENERAL] < self.limit[Pool.GENERAL]:
            self.open[Pool.GENERAL] += 1
            return Pool.GENERAL
        if self._reserve_room():
            self.open[Pool.RESERVE] += 1
            return Pool.RESERVE
        self.note_refused("max_connections and health_reserve full", None)
        return None

    def _reserve_room(self) -> bool:
        if self.open[Pool.RESERVE] < self.limit[Pool.RESERVE]:
            return True
        if self.waiting:
            oldest = next(iter(self.waiting))
            self.evicted += 1
            oldest.evict()  # releases its place now
        return self.open[Pool.RESERVE] < self.limit[Pool.RESERVE]

    def place(self, pool: Pool, remote: str | None) -> tuple[Pool, str] | None:
        """Once the address is known: the pool and client key the connection now counts under,
        or None (refused, and no longer counted anywhere)."""
        key = client_key(remote)
        if pool is Pool.GENERAL and self.clients[pool].get(key, 0) >= self.per_client[pool]:
            # This client has its share: the connection may still carry a health check.
            self.open[pool] -= 1
            if not self._reserve_room():
                self.note_refused("max_connections_per_client, health_reserve full", remote)
                return None
            pool = Pool.RESERVE
            self.open[pool] += 1
        if pool is Pool.RESERVE:
            why = None
            if self.reserve_sources and not address_in(remote, self.reserve_sources):
                why = "client not in health_reserve_allowlist"
            elif self.clients[pool].get(key, 0) >= self.per_client[pool] and not self._evict_own(key):
                why = "client holds its share of health_reserve"
            if why is not None:
                self.open[pool] -= 1
                self.note_refused(why, remote)
                return None
        self.clients[pool][key] = self.clients[pool].get(key, 0) + 1
        return pool, key

    def _evict_own(self, key: str) -> bool:
        """Make way in a client's full share of the reserve by closing its own oldest connection
        that has not sent a request (its slow connections must not lock out its health checks)."""
        for conn in self.waiting:
            if conn.key == key:
                self.evicted += 1
                conn.evict()
                return True
        return False

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
        self.host.admission.waiting.pop(self, None)
        self.busy += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def finished(self) -> None:
        self.busy -= 1
        if self.busy == 0 and not self.released:
            self.arm(KEEPALIVE_IDLE + self.host.request_timeout)

    def evict(self) -> None:
        """Make way for another reserve connection (this one has not sent a request)."""
        self._release()
        if self.transport is not None:
            self.transport.abort()

    def _release(self) -> None:
        self.host.admission.waiting.pop(self, None)
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
        if self.pool is Pool.RESERVE:
            self.host.admission.waiting[self] = None
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
