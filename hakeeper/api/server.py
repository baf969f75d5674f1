"""The agent's HTTP API: load-balancer health checks and cluster status.

Every answer comes from state the agent already holds (its last probe, its etcd mirror and its
lease deadline); no handler runs SQL or calls etcd.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hakeeper import __version__
from hakeeper.ha.model import MemberRole
from hakeeper.log import get_logger

if TYPE_CHECKING:
    from hakeeper.ha.agent import Agent

log = get_logger("hakeeper.api")


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.runner: web.AppRunner | None = None
        app = web.Application()
        for path, handler in (
            ("/health", self.health),
            ("/primary", self.primary),
            ("/leader", self.primary),
            ("/replica", self.replica),
            ("/read-only", self.read_only),
            ("/liveness", self.liveness),
            ("/cluster", self.cluster),
            ("/", self.node_status),
        ):
            app.router.add_get(path, handler)  # GET also answers HEAD
        app.on_response_prepare.append(self._hide_server)
        self.app = app

    @staticmethod
    async def _hide_server(_req: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = f"hakeeper/{__version__}"

    async def start(self) -> None:
        host, port = self.agent.cfg.api.listen_host_port
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        log.info("api_listening", host=host, port=port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- state ---------------------------------------------------------------------------------------

    def _is_primary(self) -> bool:
        return self.agent.is_writable_leader()

    def _is_replica(self) -> bool:
        st = self.agent.state
        return st is not None and st.running and st.in_recovery is True

    def _status(self) -> dict[str, Any]:
        a = self.agent
        st = a.state
        view = a.last_view
        return {
            "name": a.name,
            "role": "primary" if self._is_primary() else ("replica" if self._is_replica() else "unknown"),
            "running": bool(st and st.running),
            "timeline": st.timeline if st else None,
            "wal_lsn": st.wal_lsn if st else None,
            "streaming_from": st.streaming_from if st else None,
            "leader": view.leader.name if view.leader else None,
            "lease_remaining": round(a.lease.remaining(), 2),
            "decision": a.last_decision.action.value if a.last_decision else None,
            "why": a.last_decision.why if a.last_decision else None,
            "tags": a.cfg.tags.model_dump(),
        }

    def _answer(self, ok: bool) -> web.Response:
        return web.json_response(self._status(), status=200 if ok else 503)

    # -- handlers ------------------------------------------------------------------------------------

    async def health(self, _req: web.Request) -> web.Response:
        st = self.agent.state
        return self._answer(bool(st and st.running))

    async def primary(self, _req: web.Request) -> web.Response:
        return self._answer(self._is_primary())

    async def replica(self, req: web.Request) -> web.Response:
        ok = self._is_replica() and not self.agent.cfg.tags.noloadbalance
        lag_arg = req.query.get("lag")
        if ok and lag_arg is not None:
            try:
                bound = parse_size(lag_arg)
            except ValueError:
                return web.json_response({"error": f"invalid lag {lag_arg!r}"}, status=400)
            me = self.agent.last_view.members.get(self.agent.name)
            ok = me is not None and me.lag is not None and me.lag <= bound
        return self._answer(ok)

    async def read_only(self, _req: web.Request) -> web.Response:
        return self._answer(self._is_primary() or self._is_replica())

    async def liveness(self, _req: web.Request) -> web.Response:
        a = self.agent
        age = time.monotonic() - a.loop_heartbeat
        limit = max(a.dyn.ttl, 10 * a.dyn.loop_wait)
        return web.json_response({"loop_age": round(age, 2)}, status=200 if age < limit else 503)

    async def node_status(self, _req: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def cluster(self, _req: web.Request) -> web.Response:
        view = self.agent.last_view
        members = []
        for m in sorted(view.members.values(), key=lambda m: m.name):
            members.append(
                {
                    "name": m.name,
                    "role": m.role.value if m.role != MemberRole.UNKNOWN else None,
                    "state": m.state.value,
                    "host": m.host,
                    "port": m.port,
                    "api_url": m.api_url,
                    "timeline": m.timeline,
                    "lag": m.lag,
                    "leader": view.leader is not None and view.leader.name == m.name,
                    "eligible": m.eligible,
                    "ineligible_reason": m.ineligible_reason,
                }
            )
        return web.json_response({"leader": view.leader.name if view.leader else None, "members": members})


_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def parse_size(text: str) -> int:
    """``'16MB'`` -> 16777216; plain numbers are bytes."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgtb")
    unit = t[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(text)
    value = float(num) * _UNITS[unit]
    if value < 0:
        raise ValueError(text)
    return int(value)
