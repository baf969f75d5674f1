"""The API against hostile clients, on an in-process server over real local sockets: non-UTF-8
credentials, failed-authentication throttling (fake clock), Content-Type on mutating requests,
nested JSON, the per-client connection limit and the health-check reserve."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest

from hakeeper.api.auth import Authenticator, FailureThrottle, client_key
from hakeeper.api.connections import Admission, Pool
from hakeeper.api.models import FailoverBody, SwitchoverBody
from hakeeper.api.responses import ApiError
from hakeeper.api.server import ApiServer, parse_patch, public_message, require_json
from hakeeper.core.cluster import ClusterView, Member
from hakeeper.core.config import ApiConfig
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.reinit import ReinitPhase, ReinitState, ReinitStatus
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.util.log import setup_logging
from tests.support.ports import free_ports

TOKEN = "the-token"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Operator:
    def __init__(self) -> None:
        self.restarts = 0
        self.job: ReinitStatus | None = None

    async def restart(self, *, pending_only: bool = False) -> str:
        self.restarts += 1
        return "postgres restarted"

    async def reinitialize(self, *, delta: bool = False) -> ReinitStatus:
        self.job = ReinitStatus(
            "j1",
            "n1",
            "n0",
            ReinitState.RUNNING,
            ReinitPhase.STOPPING,
            started_at=1_700_000_000.0,
            delta=delta,
        )
        return self.job

    def reinit_status(self) -> ReinitStatus | None:
        return self.job

    async def schedule_restart(self, at: float, *, pending_only: bool = False) -> str:
        return "restart scheduled"

    def cancel_scheduled_restart(self) -> str:
        return "cancelled"

    async def reload(self) -> str:
        return "reloaded"


ARCHIVE_ERROR = "PUT failed: https://AKIAKEY:S3-Secret-1@s3.example/bucket/wal: 403"


def snapshot() -> NodeSnapshot:
    backup = {"archive": {"last_error": ARCHIVE_ERROR}, "heartbeat": None}
    return NodeSnapshot(
        name="n1", scope="s", tags={}, probe=None, view=ClusterView(), member=Member(name="n1"),
        activity=None, decision=None, loop_heartbeat=time.monotonic(), lease_remaining=0.0,
        writable=False, backup=backup,
    )  # fmt: skip


# -- pure parts --------------------------------------------------------------------------------------


def non_utf8(prefix: str, raw: bytes) -> str:
    """A header value as aiohttp hands over bytes that are not UTF-8 (surrogate escapes)."""
    return prefix + raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "header",
    [
        non_utf8("Bearer ", b"\xff\xfe\xfa"),
        non_utf8("Basic ", b"\xc3\x28\xa0"),
        "Bearer \udcff",  # a lone surrogate that is no escaped byte either
        "Basic \u00e9t\u00e9",
        "Bearer \u00ff",  # latin-1 decoding of the same bytes
    ],
)
def test_non_utf8_authorization_is_401_not_an_exception(header: str) -> None:
    a = Authenticator(ApiConfig(username="u", password="p", token=TOKEN))
    d = a.check(remote="127.0.0.1", authorization=header, has_client_cert=False)
    assert d is not None and d.status == 401 and d.message == "invalid credentials"


def test_failed_authentication_is_throttled_per_client() -> None:
    clock = FakeClock()
    a = Authenticator(
        ApiConfig(token=TOKEN), throttle=FailureThrottle(limit=3, window=60, block=30, clock=clock)
    )

    def check(remote: str, header: str) -> int:
        d = a.check(remote=remote, authorization=header, has_client_cert=False)
        return 200 if d is None else d.status

    # Two failures, time passes beyond the window: the count starts again.
    assert check("10.0.0.1", "Bearer x") == check("10.0.0.1", "Bearer y") == 401
    clock.now += 61
    assert check("10.0.0.1", "Bearer x") == check("10.0.0.1", "Bearer y") == 401
    d = a.check(remote="10.0.0.1", authorization="Bearer z", has_client_cert=False)
    assert d is not None and d.status == 401 and d.throttle_started  # the third: the block starts
    # Blocked: even the right token gets 429 (a correct guess must not be told apart).
    d = a.check(remote="10.0.0.1", authorization=f"Bearer {TOKEN}", has_client_cert=False)
    assert d is not None and d.status == 429 and d.retry_after == 30 and not d.throttle_started
    clock.now += 10
    d = a.check(remote="10.0.0.1", authorization="Bearer x", has_client_cert=False)
    assert d is not None and d.status == 429 and d.retry_after == 20
    # Another client is not locked out, nor the same /64 spared.
    assert check("10.0.0.2", f"Bearer {TOKEN}") == 200
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff") != client_key("2001:db8:0:1::1")
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert check("::ffff:10.0.0.1", f"Bearer {TOKEN}") == 429
    clock.now += 20.5
    assert check("10.0.0.1", f"Bearer {TOKEN}") == 200
    # A success clears the count.
    assert check("10.0.0.1", "Bearer x") == check("10.0.0.1", "Bearer x") == 401
    assert check("10.0.0.1", f"Bearer {TOKEN}") == 200
    assert check("10.0.0.1", "Bearer x") == check("10.0.0.1", "Bearer x") == 401


def test_throttle_memory_is_bounded() -> None:
    clock = FakeClock()
    t = FailureThrottle(limit=2, window=60, block=30, clock=clock, max_clients=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t._clients) <= 100


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        (None, False),
        ("", False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonx", False),
    ],
)
def test_require_json(value: str | None, ok: bool) -> None:
    if ok:
        require_json(value)
    else:
        with pytest.raises(ApiError) as e:
            require_json(value)
        assert e.value.status == 415


def test_deeply_nested_patch_is_400() -> None:
    for depth in (40, 5000, 200_000):
        with pytest.raises(ApiError) as e:
            parse_patch(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
        assert e.value.status == 400 and "nested" in e.value.message
    assert parse_patch(b'{"postgresql": {"parameters": {"work_mem": "4MB"}}}')


def test_member_names_in_bodies_are_bounded() -> None:
    with pytest.raises(ValueError):
        SwitchoverBody.model_validate_json(json.dumps({"candidate": "x" * 64}))
    with pytest.raises(ValueError):
        FailoverBody.model_validate_json(json.dumps({"candidate": "x" * 100_000}))
    assert SwitchoverBody.model_validate_json(json.dumps({"leader": "x" * 63})).leader == "x" * 63


def test_public_message_hides_etcd_endpoints() -> None:
    text = (
        "etcd unavailable: /v3/kv/range: all endpoints failed: https://root:s3cret@10.1.2.3:2379: "
        "Cannot connect to host 10.1.2.3:2379 ssl:default [Connection refused]; "
        "http://etcd-2.example:2379: timed out; [fd00::5]:2379: reset"
    )
    out = public_message(text)
    for leak in ("s3cret", "root", "10.1.2.3", "etcd-2.example", "fd00::5", "2379"):
        assert leak not in out, leak
    assert out.startswith("etcd unavailable: /v3/kv/range: all endpoints failed: <endpoint>: Cannot connect")


def test_admission_counts() -> None:
    cfg = ApiConfig(max_connections=3, max_connections_per_client=2, health_reserve=2)
    a = Admission(cfg)
    for _ in range(2):
        pool = a.accept()
        assert pool is Pool.GENERAL and a.place(pool, "10.0.0.1") == (Pool.GENERAL, "10.0.0.1")
    pool = a.accept()
    assert pool is Pool.GENERAL
    assert a.place(pool, "10.0.0.1") == (Pool.RESERVE, "10.0.0.1")  # over its share: reserve
    assert a.open == {Pool.GENERAL: 2, Pool.RESERVE: 1}
    pool = a.accept()
    assert pool is Pool.GENERAL and a.place(pool, "10.0.0.2") == (Pool.GENERAL, "10.0.0.2")
    assert a.accept() is Pool.RESERVE  # general full
    assert a.accept() is None  # both full
    a.release(Pool.RESERVE, None)  # a reserve connection whose handshake never ended
    a.release(Pool.GENERAL, "10.0.0.1")
    assert a.open == {Pool.GENERAL: 2, Pool.RESERVE: 1} and a.clients[Pool.GENERAL]["10.0.0.1"] == 1
    allow = Admission(
        ApiConfig(max_connections=1, health_reserve=4, health_reserve_allowlist=["10.9.0.0/16"])
    )
    assert allow.accept() is Pool.GENERAL and allow.accept() is Pool.RESERVE
    assert allow.place(Pool.RESERVE, "10.0.0.1") is None  # not an allowed source for the reserve
    assert allow.open == {Pool.GENERAL: 1, Pool.RESERVE: 0}
    assert allow.accept() is Pool.RESERVE
    assert allow.place(Pool.RESERVE, "10.9.1.1") == (Pool.RESERVE, "10.9.1.1")
    assert allow.open == {Pool.GENERAL: 1, Pool.RESERVE: 1}


# -- a real server on a local port ------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON log lines written meanwhile, as dicts."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    setup_logging("json", "INFO", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
async def api(logs: Callable[[], list[dict[str, Any]]]) -> AsyncIterator[ApiServer]:
    cfg = ApiConfig(
        listen=f"127.0.0.1:{free_ports(1)[0]}",
        token=TOKEN,
        max_connections=12,
        max_connections_per_client=8,
        health_reserve=6,
        request_timeout=3,
    )
    server = ApiServer(
        cfg,
        snapshot=snapshot,
        store=cast(ClusterStore, object()),  # the endpoints used here never reach etcd
        operator=Operator(),
        metrics=lambda _s: b"",
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw_request(port: int, data: bytes, *, source: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send ``data``, read the answer until the server closes or a response is complete."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0].split(b":")[1]):
                    break
        return out
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def port_of(api: ApiServer) -> int:
    return api.cfg.listen_host_port[1]


FOR_N1 = b'{"member": "n1"}'  # per-member actions name the member meant (n1 is this agent)


def post(path: str, headers: dict[str, str] | None = None, body: bytes = FOR_N1) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_raw_non_utf8_authorization_headers_get_401(
    api: ApiServer, logs: Callable[[], list[dict[str, Any]]]
) -> None:
    for raw in (b"Bearer \xff\xfe\x80abc", b"Basic \xc3\x28\xa0\xa1", b"\xff\xff"):
        req = (
            b"POST /restart HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nAuthorization: " + raw + b"\r\n\r\n{}"
        )
        ans = await raw_request(port_of(api), req)
        assert status_of(ans) == 401, ans
        assert body_of(ans)["error"] in ("invalid credentials", "authentication required")
    assert [e for e in logs() if e["event"] == "api_request_denied"]
    assert not [e for e in logs() if e["level"] in ("error", "critical") or "exception" in e]


async def test_mutating_requests_need_json_content_type(api: ApiServer) -> None:
    op = cast(Operator, api.operator)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for headers, body in (
        (auth, b""),
        (auth, b"{}"),
        ({**auth, "Content-Type": "text/plain"}, b"{}"),
        ({**auth, "Content-Type": "application/x-www-form-urlencoded"}, b"a=b"),
    ):
        ans = await raw_request(port_of(api), post("/restart", headers, body))
        assert status_of(ans) == 415, ans
        assert "Content-Type: application/json" in body_of(ans)["error"]
    assert op.restarts == 0  # nothing was done
    ans = await raw_request(
        port_of(api), post("/restart", {**auth, "Content-Type": "application/json"}, FOR_N1)
    )
    assert status_of(ans) == 200 and body_of(ans) == {"message": "postgres restarted"}
    assert op.restarts == 1


async def test_per_member_actions_must_name_this_member(
    api: ApiServer, logs: Callable[[], list[dict[str, Any]]]
) -> None:
    """A request meant for another member (reached through a wrong or loopback api_url) does
    nothing here: 421 with the reason; one without a member is a 400."""
    op = cast(Operator, api.operator)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for path in ("/restart", "/reinitialize", "/reload"):
        for body in (b"", b"{}", b'{"member": ""}', b'{"member": 3}'):
            ans = await raw_request(port_of(api), post(path, headers, body))
            assert status_of(ans) == 400, (path, body, ans)
            assert [e["field"] for e in body_of(ans)["errors"]] == ["member"]
        ans = await raw_request(port_of(api), post(path, headers, b'{"member": "n3"}'))
        assert status_of(ans) == 421, ans
        assert body_of(ans) == {"error": "misdirected: this is n1, not n3; nothing was done", "member": "n1"}
    assert op.restarts == 0 and op.job is None  # nothing was done
    misdirected = [e for e in logs() if e["event"] == "api_request_misdirected"]
    assert [e["path"] for e in misdirected] == ["/restart", "/reinitialize", "/reload"]
    assert all(e["meant"] == "n3" and "this is n1" in e["reason"] for e in misdirected)


async def test_reinitialize_answers_202_with_its_handle_and_get_shows_it(api: ApiServer) -> None:
    port = port_of(api)
    get = b"GET /reinitialize HTTP/1.1\r\nHost: x\r\n\r\n"
    ans = await raw_request(port, get)
    assert status_of(ans) == 404 and "no reinitialize has run" in body_of(ans)["error"]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    ans = await raw_request(port, post("/reinitialize", headers))
    assert status_of(ans) == 202 and b"Location: /reinitialize/j1" in ans
    doc = body_of(ans)
    assert doc["message"] == "reinitialize of n1 from n0 started"
    assert {k: doc[k] for k in ("id", "member", "source", "state", "phase", "finished_at", "error")} == {
        "id": "j1", "member": "n1", "source": "n0", "state": "running", "phase": "stopping",
        "finished_at": None, "error": None,
    }  # fmt: skip
    assert doc["started_at"].startswith("2023-11-14T22:13:20")
    for path in (b"/reinitialize", b"/reinitialize/j1"):
        ans = await raw_request(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(ans) == 200 and body_of(ans)["id"] == "j1" and body_of(ans)["state"] == "running"
    ans = await raw_request(port, b"GET /reinitialize/other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(ans) == 404 and "no reinitialize other" in body_of(ans)["error"]
    assert doc["delta"] is False and doc["method"] is None


async def test_reinitialize_delta_reaches_the_operator_and_a_bad_one_is_a_400(api: ApiServer) -> None:
    """``{"delta": true}`` asks the operator for a delta reinit; a non-boolean is refused before
    anything runs (a string "yes" must not mean true)."""
    op = cast(Operator, api.operator)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for bad in (
        b'{"member": "n1", "delta": "yes"}',
        b'{"member": "n1", "delta": 1}',
        b'{"member": "n1", "x": 1}',
    ):
        ans = await raw_request(port_of(api), post("/reinitialize", headers, bad))
        assert status_of(ans) == 400, (bad, ans)
        assert op.job is None
    ans = await raw_request(port_of(api), post("/reinitialize", headers, b'{"member": "n1", "delta": true}'))
    assert status_of(ans) == 202, ans
    assert op.job is not None and op.job.delta is True and body_of(ans)["delta"] is True


async def test_mutating_requests_without_credentials_get_401_first(api: ApiServer) -> None:
    # Without credentials, 401 comes first (a client learns nothing more without them).
    assert status_of(await raw_request(port_of(api), post("/restart", {}, b""))) == 401


async def test_failed_authentication_answers_429_with_retry_after(
    api: ApiServer, logs: Callable[[], list[dict[str, Any]]]
) -> None:
    clock = FakeClock()
    api.auth.throttle.clock = clock
    wrong = {"Authorization": "Bearer nope", "Content-Type": "application/json"}
    right = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for _ in range(api.auth.throttle.limit):
        assert status_of(await raw_request(port_of(api), post("/reload", wrong))) == 401
    for headers in (wrong, right):
        ans = await raw_request(port_of(api), post("/reload", headers))
        assert status_of(ans) == 429
        assert b"Retry-After: 60" in ans
    # Another client address (127.0.0.2 is loopback too) is not affected.
    assert status_of(await raw_request(port_of(api), post("/reload", right), source="127.0.0.2")) == 200
    throttled = [e for e in logs() if e["event"] == "api_auth_throttled"]
    assert len(throttled) == 1 and throttled[0]["remote"] == "127.0.0.1"  # once per block
    assert sum(e["event"] == "api_request_denied" for e in logs()) == api.auth.throttle.limit
    clock.now += 61
    assert status_of(await raw_request(port_of(api), post("/reload", right))) == 200


async def _open_partial(port: int, n: int, source: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
        s.send(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # never finished
        socks.append(s)
    await asyncio.sleep(0.2)
    return socks


async def test_one_client_cannot_take_the_pool_and_health_checks_use_the_reserve(api: ApiServer) -> None:
    port = port_of(api)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    status = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    socks = await _open_partial(port, 8, "127.0.0.1")  # its whole share
    try:
        assert api.admission.open == {Pool.GENERAL: 8, Pool.RESERVE: 0}
        # Beyond its share, this client may still ask a health check (answered, then closed)...
        t0 = time.monotonic()
        ans = await raw_request(port, health)
        assert status_of(ans) in (200, 503) and b"Connection: close" in ans
        assert time.monotonic() - t0 < 1
        # ...but nothing else.
        ans = await raw_request(port, status)
        assert status_of(ans) == 503 and body_of(ans) == {"error": "too many connections"}
        # Another client takes the rest of the pool (12), then the pool is full for everyone:
        more = await _open_partial(port, 4, "127.0.0.2")
        socks += more
        assert api.admission.open[Pool.GENERAL] == 12
        for source in ("127.0.0.3", "127.0.0.1"):
            t0 = time.monotonic()
            ans = await raw_request(port, health, source=source)
            assert status_of(ans) in (200, 503) and body_of(ans)["name"] == "n1", ans
            assert time.monotonic() - t0 < 1
            assert status_of(await raw_request(port, status, source=source)) == 503
        # A slow client in the reserve is dropped after the grace period, not request_timeout.
        slow = await _open_partial(port, 1, "127.0.0.4")
        assert api.admission.open[Pool.RESERVE] == 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(5):
                got = await asyncio.get_running_loop().sock_recv(slow[0], 100)
        except ConnectionResetError:
            got = b""
        assert got == b"" and 1.5 < time.monotonic() - t0 < 2.5
        slow[0].close()
    finally:
        for s in socks:
            s.close()
    await asyncio.sleep(0.2)
    assert api.admission.open_connections == 0
    assert status_of(await raw_request(port, status)) == 200


async def test_reserve_places_per_client_are_bounded(api: ApiServer) -> None:
    port = port_of(api)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    socks = await _open_partial(port, 8, "127.0.0.2")
    socks += await _open_partial(port, 4, "127.0.0.3")  # the general pool (12) is full
    try:
        # One client holds at most a quarter of the reserve (6 // 4 = 1 place here): its next
        # connection takes the place of its slow one.
        socks += await _open_partial(port, 1, "127.0.0.5")
        assert api.admission.open[Pool.RESERVE] == 1
        ans = await raw_request(port, health, source="127.0.0.5")
        assert body_of(ans)["name"] == "n1" and api.admission.evicted == 1
        assert api.admission.open[Pool.RESERVE] == 0
        assert status_of(await raw_request(port, health, source="127.0.0.1")) in (200, 503)
        assert body_of(await raw_request(port, health, source="127.0.0.1"))["name"] == "n1"
        # Slow clients from many addresses fill the reserve (6): a health check still gets in, in
        # place of the oldest connection that has not sent a request.
        for i in range(6, 12):
            socks += await _open_partial(port, 1, f"127.0.0.{i}")
        assert api.admission.open[Pool.RESERVE] == 6
        evicted = api.admission.evicted
        t0 = time.monotonic()
        ans = await raw_request(port, health, source="127.0.0.1")
        assert body_of(ans)["name"] == "n1" and time.monotonic() - t0 < 1
        assert api.admission.evicted == evicted + 1
    finally:
        for s in socks:
            s.close()


async def test_status_documents_mask_credentials_in_error_texts(api: ApiServer) -> None:
    ans = await raw_request(port_of(api), b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    doc = body_of(ans)
    assert doc["archive"]["last_error"] == "PUT failed: https://AKIAKEY:***@s3.example/bucket/wal: 403"
    assert b"S3-Secret-1" not in ans
