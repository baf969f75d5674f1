"""The per-member routes of a major upgrade (``hakeeper upgrade`` drives them, member by member).

``POST /upgrade/check`` changes nothing; the others act only while etcd's ``upgrade`` key names
the upgrade they are given (:class:`~hakeeper.ha.upgrade.Upgrader` checks it).  The primary's
part runs in the background: ``POST /upgrade/primary`` answers 202 with its handle, ``GET
/upgrade`` follows it; a replica's rejoin is a reinitialize (``GET /reinitialize`` follows it).
"""

from __future__ import annotations

from aiohttp import web

from hakeeper.api.member_routes import RouteHost, check_target
from hakeeper.api.models import UpgradeCheckBody, UpgradePrimaryBody, UpgradeRejoinBody, UpgradeStopBody
from hakeeper.api.responses import ApiError, json_response
from hakeeper.core.lsn import parse_lsn
from hakeeper.ha.ports import UpgradeOperations
from hakeeper.util.log import redact_values


class UpgradeRoutes:
    def __init__(self, server: RouteHost, upgrader: UpgradeOperations | None) -> None:
        self.server = server
        self._upgrader = upgrader

    @property
    def upgrader(self) -> UpgradeOperations:
        if self._upgrader is None:
            raise ApiError(503, "this agent cannot run upgrades")
        return self._upgrader

    async def check(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, UpgradeCheckBody)
        check_target(body, self.server.snapshot().name, request)
        doc = await self.server.shielded(self.upgrader.check(body.to_version, body.method))
        return json_response(redact_values(doc))

    async def primary(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, UpgradePrimaryBody)
        check_target(body, self.server.snapshot().name, request)
        job = await self.server.shielded(self.upgrader.upgrade_primary(body.id, body.to_version, body.method))
        doc = {"message": f"upgrade {job.id} of {job.member} to {job.to_major} started", **job.doc()}
        return json_response(doc, 202, headers={"Location": "/upgrade"})

    async def stop(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, UpgradeStopBody)
        check_target(body, self.server.snapshot().name, request)
        lsn = parse_lsn(body.lsn)
        if lsn is None:
            raise ApiError(400, f"lsn {body.lsn!r} is not an LSN")
        doc = await self.server.shielded(self.upgrader.stop_replica(body.id, lsn, body.timeout))
        return json_response(doc)

    async def rejoin(self, request: web.Request) -> web.StreamResponse:
        body = await self.server.body(request, UpgradeRejoinBody)
        check_target(body, self.server.snapshot().name, request)
        job = await self.server.shielded(self.upgrader.rejoin(body.id, body.to_version))
        doc = {"message": f"{job.member} is cloned again from {job.source}", **job.doc()}
        return json_response(doc, 202, headers={"Location": f"/reinitialize/{job.id}"})

    async def status(self, request: web.Request) -> web.StreamResponse:
        job = self.upgrader.status()
        if job is None:
            raise ApiError(404, "no upgrade has run on this agent since it started")
        return json_response(redact_values(job.doc()))
