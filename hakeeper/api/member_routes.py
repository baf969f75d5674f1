"""The per-member operator routes: restart (now or scheduled; DELETE cancels a scheduled one),
reinitialize (and its status) and reload.

Each acts on the agent that receives it, so its body names the member meant (:func:`check_target`).
They live apart from :class:`~hakeeper.api.server.ApiServer` so that class keeps one job
(connections, authentication, routing); this group uses the server's body parsing and shielding
through the small :class:`RouteHost` protocol.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel

from hakeeper.api import status
from hakeeper.api.models import MemberBody, ReinitBody, RestartBody
from hakeeper.api.responses import ApiError, json_response
from hakeeper.ha.ports import NodeOperations
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.util.log import get_logger, redact_values

log = get_logger("hakeeper.api")

B = TypeVar("B", bound=BaseModel)
MAX_SCHEDULE_AHEAD_S = 366 * 86400  # a scheduled restart further ahead is surely a typo
T = TypeVar("T")


class RouteHost(Protocol):
    """What a route group needs of the server."""

    operator: NodeOperations
    snapshot: Callable[[], NodeSnapshot]

    async def body(self, request: web.Request, model: type[B]) -> B: ...

    async def shielded(self, coro: Awaitable[T]) -> T: ...


class MemberRoutes:
    def __init__(self, server: RouteHost) -> None:
        self.server = server

    async def restart(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, RestartBody)
        check_target(body, self.server.snapshot().name, request)
        if body.scheduled_at is not None:
            try:
                when = body.scheduled_at.timestamp()
            except (OverflowError, OSError, ValueError):
                raise ApiError(400, "scheduled_at is out of range") from None
            if when > time.time() + MAX_SCHEDULE_AHEAD_S:
                raise ApiError(400, "scheduled_at is more than a year ahead")
            if when > time.time():
                message = await self.server.operator.schedule_restart(when, pending_only=body.pending)
                return json_response({"message": message, "scheduled_at": status.iso(when)}, 202)
        restart = self.server.operator.restart(pending_only=body.pending)
        return json_response({"message": await self.server.shielded(restart)})

    async def cancel_restart(self, request: web.Request) -> web.StreamResponse:
        check_target(await self.server.body(request, MemberBody), self.server.snapshot().name, request)
        return json_response({"message": self.server.operator.cancel_scheduled_restart()})

    async def reinitialize(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, ReinitBody)
        check_target(body, self.server.snapshot().name, request)
        job = await self.server.shielded(self.server.operator.reinitialize(delta=body.delta))
        doc = {"message": f"reinitialize of {job.member} from {job.source} started", **job.doc()}
        return json_response(doc, 202, headers={"Location": f"/reinitialize/{job.id}"})

    async def reinit_status(self, request: web.Request) -> web.StreamResponse:
        """The running or last reinitialize (``/reinitialize/<id>``: that one, if it is it)."""
        job = self.server.operator.reinit_status()
        wanted = request.match_info.get("id")
        if job is None or (wanted is not None and wanted != job.id):
            what = "no reinitialize has run" if wanted is None else f"no reinitialize {wanted} is known"
            raise ApiError(404, f"{what} on this agent since it started (it keeps the last one only)")
        # error texts (pg_basebackup's) go out masked, as in /status
        return json_response(redact_values(job.doc()))

    async def reload(self, request: web.Request) -> web.StreamResponse:
        check_target(await self.server.body(request, MemberBody), self.server.snapshot().name, request)
        return json_response({"message": await self.server.shielded(self.server.operator.reload())})


def check_target(body: MemberBody, me: str, request: web.Request) -> None:
    """A per-member action is refused (421, logged) unless its body names this member ``me``:
    the client meant another agent and reached this one (e.g. through a loopback ``api_url``)."""
    if body.member == me:
        return
    reason = f"misdirected: this is {me}, not {body.member}; nothing was done"
    log.warning(
        "api_request_misdirected", path=request.path, remote=request.remote, meant=body.member, reason=reason
    )
    raise ApiError(421, reason, member=me)
