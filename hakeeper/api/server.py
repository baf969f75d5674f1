"""The agent's HTTP API: health checks, status, metrics and operator actions.

Health checks and status documents come from state the agent already holds (its last probe,
its etcd mirror and its lease); none of them runs SQL or calls etcd.  ``GET /config`` and the
mutating endpoints go to etcd through :mod:`hakeeper.ha.requests`.  A request refused there
raises :class:`~hakeeper.core.errors.Refused`; this module alone turns its kind into an HTTP
status (:data:`REFUSAL_STATUS`).

Connection hygiene (see :mod:`hakeeper.api.connections`): at most ``api.max_connections``
connections, ``api.max_connections_per_client`` from one client, and a reserve beyond both that
only health checks may use; a connection must start a request within ``api.request_timeout`` of
opening (or of its previous response plus an idle keep-alive allowance); request bodies must
arrive within the same time.  TLS handshakes are bounded too.

Mutating endpoints need credentials (:mod:`hakeeper.api.auth`, failures throttled per client)
and ``Content-Type: application/json``, also with an empty body: a browser holding cached
Basic credentials cannot send that type cross-site without a CORS preflight, which we never
answer, so a hostile page cannot make it ``POST /restart``.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import yaml
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from pydantic import BaseModel, ValidationError

from hakeeper import __version__
from hakeeper.api import health as h
from hakeeper.api import status
from hakeeper.api.auth import Authenticator, server_ssl_context
from hakeeper.api.connections import KEEPALIVE_IDLE, Admission, Connection, Refuse
from hakeeper.api.member_routes import MemberRoutes
from hakeeper.api.models import EmptyBody, FailoverBody, SwitchoverBody
from hakeeper.api.responses import JSON, ApiError, json_response
from hakeeper.api.upgrade_routes import UpgradeRoutes
from hakeeper.core.config import ApiConfig
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha import requests
from hakeeper.ha.ports import NodeOperations, UpgradeOperations
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.util.log import get_logger, redact_values

log = get_logger("hakeeper.api")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY = 64 * 1024
MAX_OPERATION_WAIT = 120.0  # cap on waiting for a switchover/failover to complete (s)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")

# The HTTP status of each kind of refusal (hakeeper.core.errors): the only place that knows.
REFUSAL_STATUS: dict[RefusalKind, int] = {
    RefusalKind.INVALID: 400,
    RefusalKind.NOT_FOUND: 404,
    RefusalKind.CONFLICT: 409,
    RefusalKind.PRECONDITION: 412,
    RefusalKind.UNAVAILABLE: 503,
}


def refusal_response(refused: Refused) -> web.Response:
    """The answer to a refused request: the kind's HTTP status, ``{"error": message, **facts}``."""
    return error_response(REFUSAL_STATUS[refused.kind], refused.message, **refused.facts)


# What an error text may say about where etcd is: nothing (unauthenticated GETs answer with
# these texts, and endpoint URLs may carry credentials).
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]*://[^\s;,]+")
_HOST_IN_TEXT = re.compile(
    r"(?i)(?<![\w.:])(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|\[[0-9a-f:.%]+\])(?::[0-9]{1,5})?(?![\w.])"
    r"|\bhost\s+\S+"
)


def public_message(text: str) -> str:
    """``text`` without endpoint URLs, addresses and credentials, for an error body."""

    def url(m: re.Match[str]) -> str:
        return "<endpoint>:" if m.group(0).endswith(":") else "<endpoint>"

    text = _URL_IN_TEXT.sub(url, text)
    return _HOST_IN_TEXT.sub(lambda m: "host <endpoint>" if m.group(0)[:1] in "hH" else "<endpoint>", text)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **facts: Any
) -> web.Response:
    if status >= 500:
        message = public_message(message)
    body: dict[str, Any] = {"error": message}
    for k, v in facts.items():
        if k == "errors" and isinstance(v, list):
            v = [
                {"field": str(e[0]), "message": str(e[1])} if isinstance(e, tuple) and len(e) == 2 else e
                for e in v
            ]
        body.setdefault(k, v)
    return json_response(body, status, headers)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (bounded by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            return new
    return soft


def _load_openapi() -> tuple[str, dict[str, Any]]:
    text = resources.files("hakeeper.api").joinpath("openapi.yaml").read_text()
    doc = yaml.safe_load(text)
    doc["info"]["version"] = __version__
    return text, doc


class ApiServer:
    def __init__(
        self,
        cfg: ApiConfig,
        *,
        snapshot: Callable[[], NodeSnapshot],
        store: ClusterStore,
        operator: NodeOperations,
        metrics: Callable[[NodeSnapshot], bytes],
        upgrader: UpgradeOperations | None = None,
    ) -> None:
        """``snapshot``: this node now (never the HA loop itself); ``store``: the cluster's keys,
        for requests that change the cluster; ``operator``: actions on this node; ``metrics``:
        the Prometheus exposition of a snapshot."""
        self.cfg = cfg
        self.snapshot = snapshot
        self.store = store
        self.operator = operator
        self.render_metrics = metrics
        self.auth = Authenticator(self.cfg)
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.connections: dict[RequestHandler, Connection] = {}
        self.admission = Admission(cfg)
        self.health_paths: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._openapi_yaml, self._openapi = _load_openapi()
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        r = app.router

        def health(*paths: str, fn: Handler) -> None:
            for p in paths:
                r.add_get(p, fn)  # GET also answers HEAD, without a body
                self.health_paths.add(p)

        health("/primary", "/leader", "/read-write", fn=self._check(h.check_primary, lag=False))
        health("/replica", fn=self._check(h.check_replica))
        health("/read-only", fn=self._check(h.check_read_only))
        health("/sync", "/synchronous", fn=self._check(h.check_sync))
        health("/async", "/asynchronous", fn=self._check(h.check_async))
        health("/health", fn=self._check(lambda f, q: h.check_health(f), lag=False, tags=False))
        health("/liveness", fn=self._check(lambda f, q: h.check_liveness(f), lag=False, tags=False))
        health("/readiness", fn=self._check(h.check_readiness, tags=False))
        for p in ("/", "/status"):
            r.add_get(p, self.node_status)
        r.add_get("/cluster", self.cluster)
        r.add_get("/history", self.history)
        r.add_get("/config", self.get_config)
        r.add_patch("/config", self._mutating(self.patch_config))
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.openapi_json)
        r.add_get("/openapi.yaml", self.openapi_yaml)
        r.add_post("/switchover", self._mutating(self.switchover))
        r.add_delete("/switchover", self._mutating(self.cancel_switchover))
        r.add_post("/failover", self._mutating(self.failover))
        self.member_routes = MemberRoutes(self)
        r.add_post("/restart", self._mutating(self.member_routes.restart))
        r.add_delete("/restart", self._mutating(self.member_routes.cancel_restart))
        r.add_post("/reinitialize", self._mutating(self.member_routes.reinitialize))
        r.add_get("/reinitialize", self.member_routes.reinit_status)
        r.add_get("/reinitialize/{id}", self.member_routes.reinit_status)
        r.add_post("/reload", self._mutating(self.member_routes.reload))
        up = UpgradeRoutes(self, upgrader)
        r.add_post("/upgrade/check", self._mutating(up.check))
        r.add_post("/upgrade/primary", self._mutating(up.primary))
        r.add_post("/upgrade/stop", self._mutating(up.stop))
        r.add_post("/upgrade/rejoin", self._mutating(up.rejoin))
        r.add_get("/upgrade", up.status)
        app.on_response_prepare.append(self._headers)
        self.app = app

    def reauthenticate(self) -> None:
        """A reload changed the credentials or the allowlist in ``cfg``: the next request is
        checked against them (failure counts are kept: a reload is no way around a block)."""
        self.auth = Authenticator(self.cfg, throttle=self.auth.throttle)
        log.info("api_credentials_reloaded", mutating_api="enabled" if self.auth.configured else "disabled")

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        host, port = cfg.listen_host_port
        wanted = cfg.max_connections + cfg.health_reserve
        limit = raise_fd_limit(wanted + 512)
        if limit < wanted + 64:
            log.warning(
                "api_fd_limit_low",
                nofile=limit,
                max_connections=cfg.max_connections,
                health_reserve=cfg.health_reserve,
            )
        self.runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_IDLE
        )
        await self.runner.setup()
        ctx = server_ssl_context(cfg)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._protocol,
            host or None,
            port,
            ssl=ctx,
            reuse_address=True,
            backlog=min(4096, max(128, cfg.max_connections)),
            ssl_handshake_timeout=cfg.request_timeout if ctx else None,
        )
        log.info(
            "api_listening",
            host=host,
            port=port,
            tls=ctx is not None,
            verify_client=cfg.verify_client,
            mutating_api="enabled" if self.auth.configured else "disabled (no credentials)",
        )

    def _protocol(self) -> asyncio.Protocol:
        pool = self.admission.accept()
        return Refuse() if pool is None else Connection(self, pool)

    @property
    def request_timeout(self) -> float:
        return self.cfg.request_timeout

    def new_handler(self) -> RequestHandler | None:
        """aiohttp's protocol for a new connection (None once the server is stopping)."""
        if self.runner is None or self.runner.server is None:
            return None
        return self.runner.server()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.runner is not None:
            await self.runner.cleanup()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.abort()
        if self.server is not None:
            try:
                async with asyncio.timeout(2):
                    await self.server.wait_closed()
            except TimeoutError:
                pass

    # -- middleware ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = (
            self.connections.get(request.protocol) if isinstance(request.protocol, RequestHandler) else None
        )
        if conn is not None:
            conn.started()
        try:
            if conn is not None and conn.health_only:
                # A connection of the health reserve: one health check, then closed.
                resp = await self._reserved(request, handler)
                resp.force_close()
                return resp
            return await handler(request)
        except ApiError as e:
            return error_response(e.status, e.message, e.headers, **e.facts)
        except Refused as e:
            return refusal_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow",)}
            msg = {404: "no such endpoint", 405: f"method {request.method} not allowed here"}.get(
                e.status, e.reason
            )
            return error_response(e.status, msg, headers)
        except EtcdError as e:
            return error_response(503, f"etcd unavailable: {e}")  # endpoints masked there
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("api_handler_crashed", method=request.method, path=request.path)
            return error_response(500, "internal error (logged by the agent)")
        finally:
            if conn is not None:
                conn.finished()

    async def _reserved(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") and request.path in self.health_paths:
            return await handler(request)
        self.admission.note_refused("not a health check in the health reserve", request.remote)
        return error_response(503, "too many connections")

    @staticmethod
    async def _headers(_req: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = f"hakeeper/{__version__}"
        resp.headers.setdefault("Cache-Control", "no-store")

    # -- health checks -----------------------------------------------------------------------------

    def _check(
        self,
        check: Callable[[h.NodeFacts, h.HealthQuery], h.Verdict],
        *,
        lag: bool = True,
        tags: bool = True,
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            query = {k: v for k, v in request.query.items()}
            if len(query) != len(request.query):
                raise ApiError(400, "a query parameter is given more than once")
            if not tags and any(k.startswith("tag_") for k in query):
                raise ApiError(400, "this endpoint takes no tag_ parameters")
            try:
                q = h.parse_query(query, allow_lag=lag)
            except h.QueryError as e:
                raise ApiError(400, str(e)) from e
            snap = self.snapshot()
            facts = h.NodeFacts.from_snapshot(snap)
            ok, reason = check(facts, q)
            body = status.node_summary(snap)
            body["ok"] = ok
            body["reason"] = reason
            body["loop_age"] = round(facts.loop_age, 3)
            return json_response(body, 200 if ok else 503)

        return handler

    # -- status ----------------------------------------------------------------------------------------

    # Status documents are open to anyone: error texts in them (PostgreSQL's, the archiver's)
    # go out with any password or URL credentials masked, as in the logs.
    async def node_status(self, _req: web.Request) -> web.StreamResponse:
        return json_response(redact_values(status.node_status(self.snapshot())))

    async def cluster(self, _req: web.Request) -> web.StreamResponse:
        return json_response(redact_values(status.cluster_status(self.snapshot())))

    async def history(self, _req: web.Request) -> web.StreamResponse:
        return json_response(status.history_doc(self.snapshot().view.history))

    async def metrics(self, _req: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.render_metrics(self.snapshot()), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def openapi_json(self, _req: web.Request) -> web.StreamResponse:
        return json_response(self._openapi)

    async def openapi_yaml(self, _req: web.Request) -> web.StreamResponse:
        return web.Response(text=self._openapi_yaml, content_type="application/yaml")

    async def get_config(self, _req: web.Request) -> web.StreamResponse:
        cfg, rev = await requests.read_config(self.store)
        return json_response(
            {"config": cfg.model_dump(mode="json"), "revision": rev}, headers={"ETag": f'"{rev}"'}
        )

    # -- mutating ----------------------------------------------------------------------------------------

    def _mutating(self, fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            tr = request.transport
            cert = tr.get_extra_info("peercert") if tr is not None else None
            denied = self.auth.check(
                remote=request.remote,
                authorization=request.headers.get("Authorization"),
                has_client_cert=bool(cert),
            )
            if denied is not None:
                headers = {}
                if denied.challenge:
                    headers["WWW-Authenticate"] = ", ".join(self.auth.challenges)
                if denied.retry_after is not None:
                    headers["Retry-After"] = str(denied.retry_after)
                else:  # a throttled client is logged once, when its block starts, not per request
                    log.info(
                        "api_request_denied",
                        method=request.method,
                        path=request.path,
                        remote=request.remote,
                        status=denied.status,
                        reason=denied.message,
                    )
                if denied.throttle_started:
                    log.warning(
                        "api_auth_throttled",
                        remote=request.remote,
                        reason="too many failed authentication attempts",
                        seconds=self.auth.throttle.block,
                    )
                raise ApiError(denied.status, denied.message, headers)
            require_json(request.headers.get("Content-Type"))
            log.info("api_request", method=request.method, path=request.path, remote=request.remote)
            return await fn(request)

        return handler

    async def _read(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self.cfg.request_timeout):
                return await request.read()
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.cfg.request_timeout}s") from None

    async def body(self, request: web.Request, model: type[B]) -> B:
        raw = await self._read(request)
        if not raw.strip():
            raw = b"{}"
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise ApiError(400, "invalid request body", errors=_validation_errors(e)) from None

    async def shielded(self, coro: Awaitable[T]) -> T:
        """Run an operator action to its end even if the client goes away."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _wait_budget(self) -> float:
        return min(self.snapshot().view.config.switchover_timeout, MAX_OPERATION_WAIT) + 5.0

    async def switchover(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, SwitchoverBody)
        when: float | None = None
        if body.scheduled_at is not None:
            try:
                when = body.scheduled_at.timestamp()
            except (OverflowError, OSError, ValueError):
                raise ApiError(400, "scheduled_at is out of range") from None
        store = self.store
        sw = await requests.request_switchover(
            store,
            leader=body.leader,
            candidate=body.candidate,
            scheduled_at=when,
            allow_unsynced_slots=body.allow_unsynced_slots,
        )
        if sw.scheduled_at is not None and sw.scheduled_at > time.time():
            return json_response(
                {
                    "message": f"switchover scheduled for {status.iso(sw.scheduled_at)}",
                    "switchover": status.switchover_doc(sw),
                },
                202,
            )
        budget = self._wait_budget()
        new = await requests.wait_for_new_leader(
            store, old_leader=sw.leader, candidate=body.candidate, timeout=budget
        )
        if new is None:
            raise ApiError(
                503,
                f"switchover from {sw.leader} did not complete: the leader refused or aborted it, or "
                f"it took longer than {budget:.0f}s (see the leader's log)",
                leader=sw.leader,
            )
        return json_response({"message": f"switched over to {new}", "leader": new})

    async def cancel_switchover(self, request: web.Request) -> web.StreamResponse:
        await self.body(request, EmptyBody)
        sw = await requests.cancel_switchover(self.store)
        return json_response(
            {"message": f"{sw.kind.value} cancelled", "switchover": status.switchover_doc(sw)}
        )

    async def failover(self, request: web.Request) -> web.StreamResponse:
        body = await self.body(request, FailoverBody)
        store = self.store
        sw = await requests.request_failover(
            store,
            candidate=body.candidate,
            allow_data_loss=body.allow_data_loss,
            allow_unsynced_slots=body.allow_unsynced_slots,
        )
        budget = self._wait_budget()
        new = await requests.wait_for_new_leader(
            store, old_leader=sw.leader, candidate=body.candidate, timeout=budget
        )
        if new is None:
            raise ApiError(
                503,
                f"failover to {body.candidate} did not complete: it was refused or aborted, or it "
                f"took longer than {budget:.0f}s (see the agents' logs)",
                candidate=body.candidate,
            )
        return json_response({"message": f"failed over to {new}", "leader": new})

    async def patch_config(self, request: web.Request) -> web.StreamResponse:
        expected = parse_if_match(request.headers.get("If-Match"))
        patch = parse_patch(await self._read(request))
        cfg, rev = await requests.patch_config(
            self.store, patch, expected_revision=expected, last_valid=self.snapshot().last_valid_config
        )
        log.info("config_patched", revision=rev, keys=sorted(patch))
        return json_response(
            {"config": cfg.model_dump(mode="json"), "revision": rev}, headers={"ETag": f'"{rev}"'}
        )


def require_json(content_type: str | None) -> None:
    """Mutating requests must say ``Content-Type: application/json`` (parameters such as
    ``charset`` allowed), even with an empty body: a browser sends that type cross-site only
    after a CORS preflight, which this API never grants."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != JSON:
        raise ApiError(
            415,
            "mutating requests need the header Content-Type: application/json (also with an empty body)",
        )


MAX_JSON_DEPTH = 32  # no setting nests deeper; deeper input only costs stack (RecursionError)


def _json_depth(value: Any) -> int:
    """How deeply ``value`` nests (iteratively: the point is not to recurse)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def parse_patch(raw: bytes) -> dict[str, Any]:
    """A JSON merge patch from a request body: an object of strict JSON (Python's parser accepts
    ``NaN`` and ``Infinity``, which no setting can take and JSON cannot store back)."""
    try:
        patch = json.loads(raw or b"{}", parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(patch, dict):
        raise ApiError(400, "the patch must be a JSON object (RFC 7386 merge patch)")
    if _json_depth(patch) > MAX_JSON_DEPTH:
        raise ApiError(400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    return patch


def parse_if_match(value: str | None) -> int | None:
    """``If-Match: 12`` / ``"12"`` / ``W/"12"`` -> 12; absent -> None."""
    if value is None:
        return None
    m = _IF_MATCH.fullmatch(value)
    if m is None:
        raise ApiError(400, f"If-Match must be a config revision (an integer), not {value!r}")
    return int(m.group(1))


_IF_MATCH = re.compile(r'(?:W/)?"?([0-9]{1,18})"?', re.ASCII)


def _validation_errors(e: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in e.errors(include_url=False, include_input=False):
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append({"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": msg})
    return out
