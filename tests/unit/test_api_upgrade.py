"""The upgrade routes (api/upgrade_routes.py) on an in-process server with a fake upgrader: the
member check, body validation, a missing upgrader, GET /upgrade without a job, and refusals
turned into their documented HTTP statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from hakeeper.api.server import ApiServer
from hakeeper.core.config import ApiConfig
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.ports import UpgradeOperations
from hakeeper.ha.reinit import ReinitPhase, ReinitState, ReinitStatus
from hakeeper.ha.upgradejob import JobState, UpgradeJob
from tests.support.ports import free_ports
from tests.unit.test_api_hardening import (
    TOKEN,
    Operator,
    body_of,
    port_of,
    post,
    raw_request,
    snapshot,
    status_of,
)

HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
OPENAPI = yaml.safe_load((Path(__file__).parents[2] / "hakeeper/api/openapi.yaml").read_text())
BODIES = {
    "/upgrade/check": b'{"member": "n1", "to_version": 17}',
    "/upgrade/primary": b'{"member": "n1", "to_version": 17, "id": "u1"}',
    "/upgrade/stop": b'{"member": "n1", "id": "u1", "lsn": "0/3000060"}',
    "/upgrade/rejoin": b'{"member": "n1", "id": "u1", "to_version": 17}',
}


class Upgrader:
    """Refuses with ``refusal`` when set; otherwise answers like the real one."""

    def __init__(self) -> None:
        self.refusal: Refused | None = None
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.job: UpgradeJob | None = None

    def _act(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.refusal is not None:
            raise self.refusal

    def status(self) -> UpgradeJob | None:
        return self.job

    async def check(self, to_major: int, method: str) -> dict[str, Any]:
        self._act("check", to_major, method)
        return {"member": "n1", "major": 15, "to_major": to_major, "bin_dir": "/pg17/bin", "problems": []}

    async def upgrade_primary(self, upgrade_id: str, to_major: int, method: str) -> UpgradeJob:
        self._act("primary", upgrade_id, to_major, method)
        self.job = UpgradeJob(
            id=upgrade_id, member="n1", from_major=15, to_major=to_major, method=method,
            state=JobState.RUNNING, phase="preparing", started_at=1_700_000_000.0,
        )  # fmt: skip
        return self.job

    async def stop_replica(self, upgrade_id: str, lsn: int, timeout: float = 120.0) -> dict[str, Any]:
        self._act("stop", upgrade_id, lsn, timeout)
        return {"member": "n1", "reached": True, "replayed_lsn": "0/3000060", "message": "stopped"}

    async def rejoin(self, upgrade_id: str, to_major: int) -> ReinitStatus:
        self._act("rejoin", upgrade_id, to_major)
        return ReinitStatus(
            "j1", "n1", "n0", ReinitState.RUNNING, ReinitPhase.STOPPING, started_at=1_700_000_000.0
        )


async def _server(upgrader: UpgradeOperations | None) -> ApiServer:
    cfg = ApiConfig(listen=f"127.0.0.1:{free_ports(1)[0]}", token=TOKEN, request_timeout=3)
    server = ApiServer(
        cfg,
        snapshot=snapshot,
        store=cast(ClusterStore, object()),  # the upgrade routes reach etcd through the upgrader only
        operator=Operator(),
        metrics=lambda _s: b"",
        upgrader=upgrader,
    )
    await server.start()
    return server


UPGRADERS: dict[int, Upgrader] = {}  # by the server's port


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    up = Upgrader()
    server = await _server(up)
    UPGRADERS[port_of(server)] = up
    try:
        yield server
    finally:
        del UPGRADERS[port_of(server)]
        await server.stop()


def upgrader_of(api: ApiServer) -> Upgrader:
    return UPGRADERS[port_of(api)]


def documented(path: str, method: str = "post") -> set[int]:
    return {int(code) for code in OPENAPI["paths"][path][method]["responses"]}


async def test_upgrade_routes_must_name_this_member(api: ApiServer) -> None:
    for path, body in BODIES.items():
        wrong = body.replace(b'"n1"', b'"n3"')
        ans = await raw_request(port_of(api), post(path, HEADERS, wrong))
        assert status_of(ans) == 421, (path, ans)
        assert body_of(ans) == {"error": "misdirected: this is n1, not n3; nothing was done", "member": "n1"}
        assert 421 in documented(path)
    assert upgrader_of(api).calls == []  # nothing was done


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/upgrade/check", b'{"member": "n1"}', "to_version"),
        ("/upgrade/check", b'{"member": "n1", "to_version": 14}', "to_version"),
        ("/upgrade/check", b'{"member": "n1", "to_version": 100}', "to_version"),
        ("/upgrade/check", b'{"member": "n1", "to_version": "17"}', "to_version"),
        ("/upgrade/check", b'{"member": "n1", "to_version": 17, "method": "move"}', "method"),
        ("/upgrade/primary", b'{"member": "n1", "to_version": 17}', "id"),
        ("/upgrade/primary", b'{"member": "n1", "to_version": 17, "id": "a/b"}', "id"),
        ("/upgrade/stop", b'{"member": "n1", "id": "u1", "lsn": "3000060"}', "lsn"),
        ("/upgrade/stop", b'{"member": "n1", "id": "u1", "lsn": "0/1", "timeout": 0}', "timeout"),
        ("/upgrade/stop", b'{"member": "n1", "id": "u1", "lsn": "0/1", "timeout": 3601}', "timeout"),
        ("/upgrade/rejoin", b'{"member": "n1", "id": "u1", "to_version": 17, "x": 1}', "x"),
    ],
)
async def test_bad_upgrade_bodies_are_400(api: ApiServer, path: str, body: bytes, field: str) -> None:
    ans = await raw_request(port_of(api), post(path, HEADERS, body))
    assert status_of(ans) == 400, ans
    assert [e["field"] for e in body_of(ans)["errors"]] == [field]
    assert upgrader_of(api).calls == []


async def test_each_route_calls_the_upgrader_and_answers_as_documented(api: ApiServer) -> None:
    up = upgrader_of(api)
    port = port_of(api)
    ans = await raw_request(port, post("/upgrade/check", HEADERS, BODIES["/upgrade/check"]))
    assert status_of(ans) == 200 and body_of(ans)["problems"] == []
    ans = await raw_request(port, b"GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(ans) == 404 and "no upgrade has run" in body_of(ans)["error"]
    ans = await raw_request(port, post("/upgrade/primary", HEADERS, BODIES["/upgrade/primary"]))
    assert status_of(ans) == 202 and b"Location: /upgrade\r\n" in ans
    doc = body_of(ans)
    assert doc["message"] == "upgrade u1 of n1 to 17 started" and doc["state"] == "running"
    assert set(doc) - {"message"} == set(OPENAPI["components"]["schemas"]["Upgrade"]["required"])
    ans = await raw_request(port, b"GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(ans) == 200 and body_of(ans)["id"] == "u1" and "message" not in body_of(ans)
    ans = await raw_request(port, post("/upgrade/stop", HEADERS, BODIES["/upgrade/stop"]))
    assert status_of(ans) == 200 and body_of(ans)["reached"] is True
    ans = await raw_request(port, post("/upgrade/rejoin", HEADERS, BODIES["/upgrade/rejoin"]))
    assert status_of(ans) == 202 and b"Location: /reinitialize/j1\r\n" in ans
    assert body_of(ans)["message"] == "n1 is cloned again from n0"
    assert up.calls == [
        ("check", (17, "link")),
        ("primary", ("u1", 17, "link")),
        ("stop", ("u1", 0x3000060, 120.0)),
        ("rejoin", ("u1", 17)),
    ]


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (RefusalKind.INVALID, 400),
        (RefusalKind.CONFLICT, 409),
        (RefusalKind.PRECONDITION, 412),
        (RefusalKind.UNAVAILABLE, 503),
    ],
)
async def test_refusals_become_their_documented_status_with_a_json_body(
    api: ApiServer, kind: RefusalKind, status: int
) -> None:
    upgrader_of(api).refusal = Refused(kind, "no upgrade u1 is in progress in etcd", found="none")
    for path in ("/upgrade/primary", "/upgrade/rejoin"):
        ans = await raw_request(port_of(api), post(path, HEADERS, BODIES[path]))
        assert status_of(ans) == status, (path, ans)
        assert b"Content-Type: application/json" in ans
        assert body_of(ans) == {"error": "no upgrade u1 is in progress in etcd", "found": "none"}
        assert status in documented(path)


async def test_an_agent_without_an_upgrader_answers_503() -> None:
    server = await _server(None)
    try:
        port = port_of(server)
        for path, body in BODIES.items():
            ans = await raw_request(port, post(path, HEADERS, body))
            assert status_of(ans) == 503, (path, ans)
            assert body_of(ans) == {"error": "this agent cannot run upgrades"}
            assert 503 in documented(path)
        ans = await raw_request(port, b"GET /upgrade HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(ans) == 503 and 503 in documented("/upgrade", "get")
    finally:
        await server.stop()
