"""A small asyncio client for etcd's v3 JSON gateway (``/v3/...``) on aiohttp.

Gateway facts this module relies on (checked against etcd 3.4 and 3.5):

* int64 fields are JSON strings; keys and values are base64;
* fields holding their default value are omitted (a failed txn has no ``succeeded``, a keepalive
  for an unknown lease has no ``TTL``, PUT watch events have no ``type``, an empty range has no
  ``kvs``);
* unary errors are HTTP 4xx/5xx with ``{"error", "message", "code"}``; the streaming endpoints
  (``/lease/keepalive``, ``/watch``) wrap each message in ``{"result": ...}`` or ``{"error": ...}``
  and a rejected watch arrives as ``{"result": {"canceled": true, "cancel_reason": ...}}``.

Failure handling:

* every request has a deadline (``timeout`` per endpoint tried); timeouts and connection errors move
  on to the next endpoint, and the endpoint that answered is remembered;
* reads may be retried on another endpoint after any transport failure; writes (put, delete,
  txn) only when the request surely never reached etcd (the connection could not be made, or the
  request headers were never sent), otherwise :class:`EtcdUnavailable` is raised at once;
* a failure on a *reused* pooled connection (etcd restarted since it was opened) is retried on
  the same endpoint with another connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import aiohttp

from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.core.config import EtcdConfig

log = get_logger(__name__)

__all__ = [
    "KV",
    "AuthError",
    "EtcdBadResponse",
    "EtcdClient",
    "EtcdError",
    "EtcdRequestError",
    "EtcdUnavailable",
    "LeaseNotFound",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "WatchStalled",
    "cmp_create",
    "cmp_lease",
    "cmp_mod",
    "cmp_value",
    "cmp_version",
    "op_delete",
    "op_put",
    "op_range",
    "prefix_range_end",
]

# gRPC status codes used by etcd
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_FAILED_PRECONDITION = 9
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

_MAX_STALE_RETRIES = 4  # per endpoint; each failed stale connection leaves the pool
_WATCH_BACKOFF_MIN = 0.05
_WATCH_BACKOFF_MAX = 1.0
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1  # etcd's int64 fields, and the uint64 ones (lease IDs, member IDs)


# --------------------------------------------------------------------------------------------------
# errors


class EtcdError(Exception):
    """Base class of every error raised by this module."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time (transport failure or timeout on every endpoint tried)."""


class EtcdRequestError(EtcdError):
    """etcd answered, with an error."""

    def __init__(self, code: int, message: str, http_status: int = 0) -> None:
        super().__init__(f"etcd error {code} (HTTP {http_status}): {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


class LeaseNotFound(EtcdRequestError):
    """The lease expired, was revoked, or never existed."""


class AuthError(EtcdRequestError):
    """Authentication failed, no credentials were given, or permission was denied."""


class EtcdBadResponse(EtcdError):
    """etcd (or whatever answered in its place) sent a reply this client cannot decode: bad
    JSON, a wrong type, bad base64, an integer out of range.  Raised instead of the decoder's own
    exception, so a hostile or broken gateway can only ever cause an :class:`EtcdError`."""


class WatchStalled(EtcdError):
    """A confirmed watch stream sent nothing (no event, no progress notification) for
    ``seconds``: the connection may be half-open.  The mirror re-lists and watches again."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"watch sent nothing for {seconds:.1f} s")
        self.seconds = seconds


class WatchCompacted(EtcdError):
    """The watch start (or resume) revision has been compacted away; re-list and watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (compact_revision={compact_revision})")
        self.compact_revision = compact_revision


_AUTH_MESSAGES = (
    "user name is empty",
    "authentication failed",
    "permission denied",
    "invalid auth token",
    "auth: revision in header is old",
    "user name not found",
    "authentication is not enabled",
)


def _error_from(code: int, message: str, http_status: int) -> EtcdRequestError:
    low = message.lower()
    if "lease not found" in low:
        return LeaseNotFound(code, message, http_status)
    if code in (GRPC_UNAUTHENTICATED, GRPC_PERMISSION_DENIED) or any(m in low for m in _AUTH_MESSAGES):
        return AuthError(code, message, http_status)
    return EtcdRequestError(code, message, http_status)


def _code(value: Any, default: int) -> int:
    """An error code from an error body; ``default`` when it is not an integer (an error is
    reported as an error whatever its code field holds)."""
    try:
        return _int(value)
    except EtcdBadResponse:
        return default


def _body_error(body: Mapping[str, Any], http_status: int) -> EtcdRequestError:
    err = body.get("error")
    if isinstance(err, dict):  # streaming endpoints: {"error": {"grpc_code", "http_code", "message"}}
        return _error_from(
            _code(err.get("grpc_code", err.get("code", -1)), -1),
            str(err.get("message"))[:1000],
            _code(err.get("http_code", http_status), http_status),
        )
    message = body.get("message") or err or json.dumps(body)[:200]
    return _error_from(_code(body.get("code", -1), -1), str(message)[:1000], http_status)


def _http_error(http_status: int, raw: bytes) -> EtcdRequestError:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict):
        return _body_error(body, http_status)
    return EtcdRequestError(-1, raw[:200].decode(errors="replace"), http_status)


def _is_token_error(err: EtcdRequestError) -> bool:
    low = err.message.lower()
    return "invalid auth token" in low or "revision in header is old" in low


# --------------------------------------------------------------------------------------------------
# codec


def b64(data: bytes | str) -> str:
    """Base64 text of ``data`` (str is encoded as UTF-8)."""
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode("ascii")


def b64_key(key: str) -> str:
    # surrogateescape round-trips keys that were decoded from non-UTF-8 bytes
    return base64.b64encode(key.encode("utf-8", "surrogateescape")).decode("ascii")


def unb64(text: Any) -> bytes:
    """The bytes of a base64 field (absent or empty: ``b""``); :class:`EtcdBadResponse` for
    anything that is not canonical base64 text."""
    if text is None or text == "":
        return b""
    if not isinstance(text, str):
        raise EtcdBadResponse(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: non-ASCII characters
        raise EtcdBadResponse(f"bad base64 {text[:40]!r}: {e}") from None


def decode_key(text: Any) -> str:
    return unb64(text).decode("utf-8", "surrogateescape")


def prefix_range_end(prefix: bytes | str) -> bytes:
    """The ``range_end`` covering every key that starts with ``prefix``.

    The last byte that is not 0xff is incremented and everything after it dropped; if there is
    none (empty prefix, or only 0xff bytes) the answer is ``b"\\0"``, which etcd reads as
    "to the end of the keyspace".
    """
    if isinstance(prefix, str):
        prefix = prefix.encode("utf-8", "surrogateescape")
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _int(value: Any) -> int:
    """An int64/uint64 field: the gateway sends them as decimal strings (plain JSON numbers
    accepted too); absent means 0.  Anything else is :class:`EtcdBadResponse`."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdBadResponse(f"expected an integer, got {type(value).__name__} {value!r:.40}")
    if isinstance(value, str) and not (value.isascii() and value.lstrip("-").isdigit() and len(value) <= 21):
        raise EtcdBadResponse(f"expected an integer, got {value!r:.40}")
    n = int(value)
    if not _INT64_MIN <= n <= _UINT64_MAX:
        raise EtcdBadResponse(f"integer {n} out of the 64-bit range")
    return n


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` as a JSON object (absent: empty); :class:`EtcdBadResponse` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EtcdBadResponse(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _arr(value: Any, what: str) -> list[Any]:
    """``value`` as a JSON array (absent: empty); :class:`EtcdBadResponse` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EtcdBadResponse(f"{what}: expected an array, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, d: Any) -> KV:
        d = _obj(d, "kv")
        return cls(
            key=decode_key(d.get("key")),
            value=unb64(d.get("value")),
            create_revision=_int(d.get("create_revision")),
            mod_revision=_int(d.get("mod_revision")),
            version=_int(d.get("version")),
            lease=_int(d.get("lease")),
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KV


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[list[KV]] = field(default_factory=list)


# Every decoder below raises EtcdBadResponse, and only that, for a body of the wrong shape
# (tests/unit/test_etcd_codec.py checks it over arbitrary JSON): a reply is etcd's word on the
# cluster, so a reply we cannot read is an etcd failure like a timeout, never a crash.


def parse_kvs(body: Any) -> list[KV]:
    return [KV.from_json(kv) for kv in _arr(_obj(body, "range reply").get("kvs"), "kvs")]


def header_revision(body: Any) -> int:
    return _int(_obj(_obj(body, "reply").get("header"), "header").get("revision"))


def parse_txn(body: Any) -> TxnResult:
    body = _obj(body, "txn reply")
    ranges: list[list[KV]] = []
    for resp in _arr(body.get("responses"), "responses"):
        resp = _obj(resp, "txn response")
        if "response_range" in resp:
            ranges.append(parse_kvs(resp["response_range"]))
    succeeded = body.get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise EtcdBadResponse(f"txn reply: succeeded is {type(succeeded).__name__}, not a boolean")
    return TxnResult(succeeded=succeeded, revision=header_revision(body), ranges=ranges)


def parse_events(result: Any) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    for ev in _arr(_obj(result, "watch result").get("events"), "events"):
        ev = _obj(ev, "watch event")
        typ: Literal["PUT", "DELETE"] = "DELETE" if ev.get("type") == "DELETE" else "PUT"
        out.append(WatchEvent(typ, KV.from_json(ev.get("kv"))))
    return out


class JsonStreamParser:
    """Splits a chunked newline-delimited JSON stream into objects, whatever the chunk sizes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[Any]:
        self._buf += chunk
        out: list[Any] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(self._buf[start:nl]).strip()
            start = nl + 1
            if line:
                try:
                    out.append(json.loads(line))
                except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                    del self._buf[:start]
                    raise EtcdBadResponse(f"bad JSON in a stream: {line[:80]!r}: {e}") from None
        del self._buf[:start]
        return out

    def pending(self) -> bytes:
        return bytes(self._buf)


# --------------------------------------------------------------------------------------------------
# txn builders

CmpOp = Literal["=", "!=", "<", ">"]
_RESULTS: dict[str, str] = {"=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


def _compare(
    key: str, op: str, target: str, field_name: str, value: str, prefix: bool = False
) -> dict[str, Any]:
    try:
        result = _RESULTS[op]
    except KeyError:
        raise ValueError(f"bad compare operator {op!r}") from None
    cmp = {"key": b64_key(key), "result": result, "target": target, field_name: value}
    if prefix:
        # etcd (3.3+) then compares every key under the prefix: true only if all of them pass;
        # with no key there, it compares one absent key (revisions 0).
        cmp["range_end"] = b64(prefix_range_end(key))
    return cmp


def cmp_create(key: str, op: CmpOp, revision: int, *, prefix: bool = False) -> dict[str, Any]:
    return _compare(key, op, "CREATE", "create_revision", str(int(revision)), prefix)


def cmp_mod(key: str, op: CmpOp, revision: int, *, prefix: bool = False) -> dict[str, Any]:
    return _compare(key, op, "MOD", "mod_revision", str(int(revision)), prefix)


def cmp_version(key: str, op: CmpOp, version: int) -> dict[str, Any]:
    return _compare(key, op, "VERSION", "version", str(int(version)))


def cmp_value(key: str, op: CmpOp, value: bytes | str) -> dict[str, Any]:
    return _compare(key, op, "VALUE", "value", b64(value))


def cmp_lease(key: str, op: CmpOp, lease: int) -> dict[str, Any]:
    return _compare(key, op, "LEASE", "lease", str(int(lease)))


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64_key(key), "value": b64(value)}
    if lease:
        req["lease"] = str(int(lease))
    return {"request_put": req}


def op_delete(key: str, prefix: bool = False) -> dict[str, Any]:
    req = {"key": b64_key(key)}
    if prefix:
        req["range_end"] = b64(prefix_range_end(key))
    return {"request_delete_range": req}


def op_range(key: str, prefix: bool = False) -> dict[str, Any]:
    req = {"key": b64_key(key)}
    if prefix:
        req["range_end"] = b64(prefix_range_end(key))
    return {"request_range": req}


# --------------------------------------------------------------------------------------------------
# transport


class _Attempt:
    """What aiohttp did for one request, filled in by trace callbacks."""

    __slots__ = ("headers_sent", "reused")

    def __init__(self) -> None:
        self.reused = False
        self.headers_sent = False


async def _on_reuse(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
    att = ctx.trace_request_ctx
    if isinstance(att, _Attempt):
        att.reused = True


async def _on_headers_sent(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
    att = ctx.trace_request_ctx
    if isinstance(att, _Attempt):
        att.headers_sent = True


class _Failure(Exception):
    """Internal: one endpoint failed. ``delivered`` is False when etcd surely never saw the request."""

    def __init__(self, error: BaseException | str, *, delivered: bool, stale: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.delivered = delivered
        self.stale = stale

    def describe(self) -> str:
        if isinstance(self.error, BaseException):
            return f"{type(self.error).__name__}: {self.error}".rstrip(": ")
        return self.error


def _watch_result(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise EtcdBadResponse(f"unexpected watch message {msg!r:.200}")
    if "error" in msg:
        raise _body_error(msg, 200)
    result = msg.get("result")
    if not isinstance(result, dict):
        raise EtcdBadResponse(f"unexpected watch message {msg!r:.200}")
    compact = _int(result.get("compact_revision"))
    if compact:
        raise WatchCompacted(compact)
    if result.get("canceled"):
        reason = str(result.get("cancel_reason") or "watch canceled")
        code = -1
        if "code = " in reason:
            name = reason.split("code = ", 1)[1].split(" ", 1)[0]
            code = _GRPC_NAMES.get(name, -1)
        raise _error_from(code, reason, 200)
    return cast(dict[str, Any], result)


async def _next_watch_chunk(
    chunks: AsyncIterator[bytes], created: bool, timeout: float, stall_timeout: float | None
) -> bytes | None:
    """The next chunk of a watch stream (None at its end).  Until etcd confirmed the stream, it
    must come within ``timeout``; after that within ``stall_timeout`` (None: no limit), else
    :class:`WatchStalled` -- a half-open connection would otherwise block here forever."""
    try:
        if not created:
            async with asyncio.timeout(timeout):
                return await anext(chunks)
        if stall_timeout is None:
            return await anext(chunks)
        try:
            async with asyncio.timeout(stall_timeout):
                return await anext(chunks)
        except TimeoutError:
            raise WatchStalled(stall_timeout) from None
    except StopAsyncIteration:
        return None


def _reconnect_reason(e: Exception) -> str:
    """Why a watch stream is re-opened; raises ``e`` when re-opening cannot help."""
    if isinstance(e, EtcdRequestError):
        if e.code != GRPC_UNAVAILABLE:
            raise e
        return e.message
    if isinstance(e, EtcdUnavailable):
        return str(e)
    return f"{type(e).__name__}: {e}".rstrip(": ")


@dataclass(slots=True)
class _WatchProgress:
    """What one :meth:`EtcdClient.watch_prefix` carries from one stream to the next."""

    next_rev: int  # the revision to resume from (0: from now)
    backoff: float  # before the next reconnect
    reauthed: bool = False  # a new token was fetched since the last stream was confirmed
    created: bool = False  # the current stream was confirmed by etcd


_plain_password_warned: set[str] = set()


def _warn_password_over_http(endpoints: list[str], username: str) -> None:
    """Password authentication over plain http:// sends the password (and then the token)
    readable to anyone on the path: say so, once per endpoint and process."""
    plain = [e for e in endpoints if e.startswith("http://") and e not in _plain_password_warned]
    if plain:
        _plain_password_warned.update(plain)
        log.warning(
            "etcd_password_unencrypted",
            endpoints=plain,
            user=username,
            reason="etcd password authentication over http:// sends the password and token in clear "
            "text; use https:// endpoints (etcd.cacert, etcd.cert, etcd.key)",
        )


class EtcdClient:
    """asyncio client for etcd's v3 JSON gateway with endpoint rotation, TLS and auth."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float = 1.0,
        cacert: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._idx = 0
        self.timeout = timeout
        self._cacert = cacert
        self._cert = cert
        self._key = key
        self._username = username
        self._password = password
        self._token: str | None = None
        if username is not None:
            _warn_password_over_http(self._endpoints, username)
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._session_lock = asyncio.Lock()
        self._closed = False
        # Called with (path, seconds, ok) after every unary request: metrics hook.
        self.on_request: Callable[[str, float, bool], None] | None = None

    @classmethod
    def from_config(cls, cfg: EtcdConfig, *, min_timeout: float = 0.0) -> EtcdClient:
        """A client for a node config's ``etcd`` section (endpoints, timeout, TLS, auth)."""
        return cls(
            cfg.hosts,
            timeout=max(cfg.request_timeout, min_timeout),
            cacert=cfg.cacert,
            cert=cfg.cert,
            key=cfg.key,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
        )

    def __repr__(self) -> str:  # never show credentials
        user = f", username={self._username!r}" if self._username else ""
        return f"EtcdClient(endpoints={self._endpoints!r}{user})"

    # ---- life cycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._idx]

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def _build_ssl(self) -> ssl.SSLContext | None:
        if not any(e.startswith("https:") for e in self._endpoints):
            return None
        ctx = ssl.create_default_context(cafile=str(self._cacert) if self._cacert else None)
        if self._cert is not None:
            ctx.load_cert_chain(str(self._cert), str(self._key) if self._key else None)
        return ctx

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        async with self._session_lock:
            if self._closed:
                raise EtcdError("client is closed")
            if self._session is None:
                ssl_ctx = await asyncio.to_thread(self._build_ssl)  # reads files: off the loop
                trace = aiohttp.TraceConfig()
                trace.on_connection_reuseconn.append(_on_reuse)
                trace.on_request_headers_sent.append(_on_headers_sent)
                connector = aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else True, limit=0)
                self._session = aiohttp.ClientSession(connector=connector, trace_configs=[trace])
            return self._session

    def _mark_failed(self, idx: int) -> None:
        """Move on from endpoint ``idx`` unless somebody already did."""
        if self._idx == idx and len(self._endpoints) > 1:
            self._idx = (idx + 1) % len(self._endpoints)

    # ---- auth -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, stale_token: str | None, timeout: float) -> None:
        if self._username is None:
            return
        async with self._auth_lock:
            if self._token is not None and self._token != stale_token:
                return  # someone else already refreshed it
            body = await self._call(
                "/v3/auth/authenticate",
                {"name": self._username, "password": self._password or ""},
                timeout=timeout,
                idempotent=True,
                auth=False,
            )
            token = body.get("token")
            if not isinstance(token, str) or not token:
                raise AuthError(-1, "authenticate returned no token", 200)
            self._token = token
            log.debug("etcd_token_refreshed", endpoint=self.endpoint, user=self._username)

    # ---- request core -------------------------------------------------------------------------

    async def _request(
        self, path: str, payload: Mapping[str, Any], *, timeout: float | None, idempotent: bool
    ) -> dict[str, Any]:
        """POST ``payload`` with auth handling: one re-authentication on an invalid token."""
        if self.on_request is None:
            return await self._request_once(path, payload, timeout=timeout, idempotent=idempotent)
        t0 = time.monotonic()
        ok = False
        try:
            body = await self._request_once(path, payload, timeout=timeout, idempotent=idempotent)
            ok = True
            return body
        finally:
            self.on_request(path, time.monotonic() - t0, ok)

    async def _request_once(
        self, path: str, payload: Mapping[str, Any], *, timeout: float | None, idempotent: bool
    ) -> dict[str, Any]:
        to = self.timeout if timeout is None else timeout
        if self._username is not None and self._token is None:
            await self._authenticate(None, to)
        token = self._token
        try:
            return await self._call(path, payload, timeout=to, idempotent=idempotent, auth=True)
        except AuthError as e:
            if self._username is None or not _is_token_error(e):
                raise
        log.info("etcd_token_expired", endpoint=self.endpoint)
        await self._authenticate(token, to)
        return await self._call(path, payload, timeout=to, idempotent=idempotent, auth=True)

    async def _call(
        self, path: str, payload: Mapping[str, Any], *, timeout: float, idempotent: bool, auth: bool
    ) -> dict[str, Any]:
        """Try each endpoint once, starting with the current one; ``timeout`` per endpoint."""
        session = await self._get_session()
        n = len(self._endpoints)
        start = self._idx
        errors: list[str] = []
        for i in range(n):
            idx = (start + i) % n
            url = self._endpoints[idx] + path
            try:
                status, body = await self._attempt(session, url, payload, timeout, auth)
            except _Failure as f:
                errors.append(f"{self._endpoints[idx]}: {f.describe()}")
                log.warning(
                    "etcd_endpoint_failed",
                    endpoint=self._endpoints[idx],
                    path=path,
                    error=f.describe(),
                    delivered=f.delivered,
                )
                self._mark_failed(idx)
                if f.delivered and not idempotent:
                    raise EtcdUnavailable(
                        f"{path} may or may not have been applied: {'; '.join(errors)}"
                    ) from (f.error if isinstance(f.error, BaseException) else None)
                continue
            if status != 200 or "error" in body:
                err = _body_error(body, status)
                if err.code == GRPC_UNAVAILABLE:
                    # etcd answered but cannot serve (no leader, shutting down...)
                    errors.append(f"{self._endpoints[idx]}: {err.message}")
                    log.warning(
                        "etcd_endpoint_failed",
                        endpoint=self._endpoints[idx],
                        path=path,
                        error=err.message,
                        delivered=True,
                    )
                    self._mark_failed(idx)
                    if not idempotent:
                        raise EtcdUnavailable(f"{path}: {'; '.join(errors)}") from err
                    continue
                self._idx = idx
                raise err
            if self._idx != idx:
                log.info("etcd_endpoint_switched", endpoint=self._endpoints[idx])
            self._idx = idx
            return body
        raise EtcdUnavailable(f"{path}: all endpoints failed: {'; '.join(errors)}")

    async def _attempt(
        self, session: aiohttp.ClientSession, url: str, payload: Mapping[str, Any], timeout: float, auth: bool
    ) -> tuple[int, dict[str, Any]]:
        """One endpoint: a request, repeated only when a reused pooled connection turned out dead."""
        deadline = time.monotonic() + timeout
        for retry in range(_MAX_STALE_RETRIES + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Failure(TimeoutError("timed out"), delivered=False)
            try:
                return await self._once(session, url, payload, remaining, auth)
            except _Failure as f:
                if f.stale and retry < _MAX_STALE_RETRIES:
                    log.info("etcd_stale_connection_retried", url=url, error=f.describe())
                    continue
                raise
        raise AssertionError("unreachable")

    async def _once(
        self, session: aiohttp.ClientSession, url: str, payload: Mapping[str, Any], timeout: float, auth: bool
    ) -> tuple[int, dict[str, Any]]:
        att = _Attempt()
        headers = self._headers() if auth else {}
        # connect timeouts inside aiohttp, the total one here: a timeout before the request headers
        # were written means etcd never saw the request.
        ct = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout)
        try:
            async with asyncio.timeout(timeout):
                async with session.post(
                    url, json=payload, headers=headers, timeout=ct, trace_request_ctx=att
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
        except TimeoutError as e:  # includes aiohttp's connect timeouts
            raise _Failure(e, delivered=att.headers_sent) from e
        except aiohttp.ClientConnectorError as e:
            raise _Failure(e, delivered=False) from e
        except aiohttp.ClientError as e:
            # "Can not write request body": the request never got through.
            not_sent = not att.headers_sent or "Can not write request body" in str(e)
            # A failure (not a timeout) on a reused pooled connection: etcd went away since the
            # connection was opened. etcd may in theory have crashed while handling this very
            # request, but a reused connection that died is overwhelmingly the stale case, so it is
            # retried once more on a fresh or another pooled connection.
            raise _Failure(e, delivered=not not_sent, stale=att.reused) from e
        try:
            text = raw.decode()
            # streaming endpoints answer with newline-delimited messages; we send one request
            body = json.loads(text.split("\n", 1)[0] if "\n" in text.strip() else text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            if status >= 500:
                raise _Failure(f"HTTP {status}: {raw[:200]!r}", delivered=True) from e
            raise EtcdRequestError(-1, f"bad reply (HTTP {status}): {raw[:200]!r}", status) from e
        if not isinstance(body, dict):
            raise EtcdRequestError(-1, f"bad reply (HTTP {status}): {raw[:200]!r}", status)
        return status, body

    # ---- KV ----------------------------------------------------------------------------------------

    async def get(self, key: str, *, timeout: float | None = None) -> KV | None:
        body = await self._request("/v3/kv/range", {"key": b64_key(key)}, timeout=timeout, idempotent=True)
        kvs = parse_kvs(body)
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> tuple[list[KV], int]:
        payload = {
            "key": b64_key(prefix),
            "range_end": b64(prefix_range_end(prefix)),
            "sort_order": "ASCEND",
            "sort_target": "KEY",
        }
        body = await self._request("/v3/kv/range", payload, timeout=timeout, idempotent=True)
        kvs = sorted(parse_kvs(body), key=lambda kv: kv.key)
        return kvs, header_revision(body)

    async def put(self, key: str, value: bytes | str, *, lease: int = 0, timeout: float | None = None) -> int:
        payload: dict[str, Any] = {"key": b64_key(key), "value": b64(value)}
        if lease:
            payload["lease"] = str(int(lease))
        body = await self._request("/v3/kv/put", payload, timeout=timeout, idempotent=False)
        return header_revision(body)

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        payload = op_delete(key, prefix)["request_delete_range"]
        body = await self._request("/v3/kv/deleterange", payload, timeout=timeout, idempotent=False)
        return _int(body.get("deleted"))

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        payload = {"compare": compare, "success": success, "failure": failure or []}
        body = await self._request("/v3/kv/txn", payload, timeout=timeout, idempotent=False)
        return parse_txn(body)

    async def compact(self, revision: int, *, timeout: float | None = None) -> None:
        await self._request(
            "/v3/kv/compaction", {"revision": str(int(revision))}, timeout=timeout, idempotent=True
        )

    # ---- leases ----------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> int:
        # a lost grant only leaves an unused lease behind, which expires by itself
        body = await self._request(
            "/v3/lease/grant", {"TTL": str(int(ttl)), "ID": "0"}, timeout=timeout, idempotent=True
        )
        lease_id = _int(body.get("ID"))
        if not lease_id:
            raise EtcdRequestError(-1, f"lease grant returned no ID: {body!r:.200}", 200)
        return lease_id

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        body = await self._request(
            "/v3/lease/keepalive", {"ID": str(int(lease_id))}, timeout=timeout, idempotent=True
        )
        result = body.get("result", body)
        if not isinstance(result, dict):
            raise EtcdRequestError(-1, f"unexpected keepalive reply {body!r:.200}", 200)
        ttl = _int(result.get("TTL"))
        if ttl <= 0:
            raise LeaseNotFound(GRPC_NOT_FOUND, f"lease {lease_id:x} not found (keepalive)", 200)
        return ttl

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        try:
            await self._request(
                "/v3/lease/revoke", {"ID": str(int(lease_id))}, timeout=timeout, idempotent=True
            )
        except LeaseNotFound:
            pass

    async def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        body = await self._request(
            "/v3/lease/timetolive", {"ID": str(int(lease_id))}, timeout=timeout, idempotent=True
        )
        return _int(body.get("TTL"))

    # ---- watch -----------------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str, start_revision: int, *, stall_timeout: float | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Events under ``prefix`` from ``start_revision`` on (0: from now), in order, forever.

        A dropped stream is re-opened (rotating endpoints, backoff up to 1 s) from the last seen
        revision + 1. Raises :class:`WatchCompacted` when that revision has been compacted,
        :class:`AuthError` when the credentials are rejected, :class:`EtcdBadResponse` on a
        message it cannot decode, and :class:`WatchStalled` when a confirmed stream sent nothing
        for ``stall_timeout`` seconds (etcd is asked for progress notifications, so a quiet but
        healthy stream still speaks now and then; the caller re-lists to learn what it missed).
        """
        create: dict[str, Any] = {
            "key": b64_key(prefix),
            "range_end": b64(prefix_range_end(prefix)),
            "progress_notify": True,
        }
        st = _WatchProgress(next_rev=int(start_revision), backoff=_WATCH_BACKOFF_MIN)
        while True:
            idx = self._idx
            st.created = False
            error = "stream closed"
            try:
                if self._username is not None and self._token is None:
                    await self._authenticate(None, self.timeout)
                session = await self._get_session()
                req = dict(create)
                if st.next_rev > 0:
                    req["start_revision"] = str(st.next_rev)
                token = self._token
                # No total timeout: the stream stays open for as long as etcd lives. Connecting and
                # the "created" reply must each happen within the timeout.
                ct = aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_connect=self.timeout, sock_read=None
                )
                async with asyncio.timeout(self.timeout):
                    resp = await session.post(
                        self._endpoints[idx] + "/v3/watch",
                        json={"create_request": req},
                        headers=self._headers(),
                        timeout=ct,
                    )
                try:
                    if resp.status != 200:
                        raise _http_error(resp.status, await resp.read())
                    parser = JsonStreamParser()
                    chunks = resp.content.iter_any().__aiter__()
                    while (
                        chunk := await _next_watch_chunk(chunks, st.created, self.timeout, stall_timeout)
                    ) is not None:
                        events = self._watch_batch(parser.feed(chunk), idx, st)
                        # etcd never splits one revision's events (one txn) across responses, and
                        # we resume at a revision boundary; skip what was delivered before a
                        # reconnect, compare against the revision this batch started from
                        floor = st.next_rev
                        for ev in events:
                            if ev.kv.mod_revision < floor:
                                continue
                            st.next_rev = max(st.next_rev, ev.kv.mod_revision + 1)
                            yield ev
                finally:
                    resp.release()
            except AuthError as e:
                if self._username is None or not _is_token_error(e) or st.reauthed:
                    raise
                st.reauthed = True
                log.info("etcd_token_expired", endpoint=self._endpoints[idx])
                try:
                    await self._authenticate(token, self.timeout)
                    continue
                except EtcdUnavailable as ue:
                    error = str(ue)
            except (EtcdRequestError, EtcdUnavailable, TimeoutError, aiohttp.ClientError, ValueError) as e:
                error = _reconnect_reason(e)
            log.warning(
                "etcd_watch_reconnecting",
                endpoint=self._endpoints[idx],
                prefix=prefix,
                next_revision=st.next_rev,
                error=error,
                backoff=st.backoff,
            )
            self._mark_failed(idx)
            await asyncio.sleep(st.backoff)
            if not st.created:
                st.backoff = min(st.backoff * 2, _WATCH_BACKOFF_MAX)

    def _watch_batch(self, messages: list[Any], idx: int, st: _WatchProgress) -> list[WatchEvent]:
        """The events of one chunk's messages.  The first message of a stream confirms it: the
        backoff resets, the endpoint is kept, and a watch from now learns its revision."""
        events: list[WatchEvent] = []
        for msg in messages:
            result = _watch_result(msg)
            if not st.created:
                st.created = True
                st.backoff = _WATCH_BACKOFF_MIN
                st.reauthed = False
                self._idx = idx
                if st.next_rev <= 0:
                    st.next_rev = header_revision(result) + 1
            events.extend(parse_events(result))
        return events


_GRPC_NAMES = {
    "InvalidArgument": GRPC_INVALID_ARGUMENT,
    "NotFound": GRPC_NOT_FOUND,
    "PermissionDenied": GRPC_PERMISSION_DENIED,
    "FailedPrecondition": GRPC_FAILED_PRECONDITION,
    "Unavailable": GRPC_UNAVAILABLE,
    "Unauthenticated": GRPC_UNAUTHENTICATED,
}
