"""Who may call the mutating endpoints, and the TLS context of the API.

Order of the checks (the first failing one answers):

1. the client address must be in ``api.allowlist`` (when one is set)            -> 403
2. the node must have credentials configured (token or username/password)      -> 403
3. with ``verify_client`` optional/required, a verified client certificate      -> 403
4. the client has not failed authentication too often lately (:class:`FailureThrottle`) -> 429
5. a matching ``Authorization: Bearer <token>`` or ``Basic`` header             -> 401

Secrets are compared with :func:`hmac.compare_digest` and never logged.  A header that is not
valid UTF-8 (aiohttp hands its bytes over as surrogate escapes) is wrong credentials, not a crash.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from hakeeper.core.config import ApiConfig

REALM = 'Basic realm="hakeeper", charset="UTF-8"'
BEARER_CHALLENGE = 'Bearer realm="hakeeper"'

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# Failed authentication: after this many failures within the window, a client address is
# answered 429 for BLOCK_SECONDS, whatever it sends (a correct guess included: no oracle).
FAILURE_LIMIT = 10
FAILURE_WINDOW = 60.0
BLOCK_SECONDS = 60.0
MAX_TRACKED_CLIENTS = 10_000  # bound on the memory an address-cycling client can make us use


@dataclass(frozen=True, slots=True)
class Denied:
    status: int  # 401, 403 or 429
    message: str
    challenge: bool = False  # send WWW-Authenticate
    retry_after: int | None = None  # seconds, for 429
    throttle_started: bool = False  # this failure started a block (log it: once per block)


def address_in(remote: str | None, networks: list[IPNetwork]) -> bool:
    """Whether the client address ``remote`` (IPv4-mapped IPv6 as IPv4) is in one of ``networks``."""
    if remote is None:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def client_key(remote: str | None) -> str:
    """The unit a throttle counts: an IPv4 address, or the /64 of an IPv6 address (one host
    commonly owns a whole /64 and could otherwise rotate through it)."""
    if remote is None:
        return "?"
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True, slots=True)
class _Record:
    window_start: float
    failures: int
    blocked_until: float = 0.0


class FailureThrottle:
    """Counts failed authentications per client (:func:`client_key`) in a fixed window."""

    def __init__(
        self,
        *,
        limit: int = FAILURE_LIMIT,
        window: float = FAILURE_WINDOW,
        block: float = BLOCK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.clock = clock
        self.max_clients = max_clients
        self._clients: dict[str, _Record] = {}

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None when it may now."""
        rec = self._clients.get(key)
        if rec is None:
            return None
        left = rec.blocked_until - self.clock()
        return left if left > 0 else None

    def failed(self, key: str) -> bool:
        """Record a failure; True when it starts a block."""
        now = self.clock()
        rec = self._clients.get(key)
        if rec is None or now - rec.window_start >= self.window:
            if rec is None and len(self._clients) >= self.max_clients:
                self._prune(now)
            rec = _Record(window_start=now, failures=0)
        rec = replace(rec, failures=rec.failures + 1)
        started = rec.failures >= self.limit and rec.blocked_until <= now
        if started:
            # A fresh window after the block: the next failure counts from one again.
            rec = _Record(window_start=now + self.block, failures=0, blocked_until=now + self.block)
        self._clients[key] = rec
        return started

    def succeeded(self, key: str) -> None:
        self._clients.pop(key, None)

    def _prune(self, now: float) -> None:
        for key, rec in list(self._clients.items()):
            if rec.blocked_until <= now and now - rec.window_start >= self.window:
                del self._clients[key]
        while len(self._clients) >= self.max_clients:
            # Still full of live records: forget the oldest (dicts keep insertion order).
            del self._clients[next(iter(self._clients))]


def _header_bytes(value: str) -> bytes | None:
    """A header value as the bytes the client sent (aiohttp decodes them as UTF-8 with
    surrogate escapes), or None when it cannot be turned back into bytes."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


class Authenticator:
    def __init__(self, cfg: ApiConfig, *, throttle: FailureThrottle | None = None) -> None:
        self.throttle = throttle or FailureThrottle()
        self.allowlist: list[IPNetwork] = [ipaddress.ip_network(a, strict=False) for a in cfg.allowlist]
        self.token = cfg.token.get_secret_value().encode() if cfg.token else None
        self.username = cfg.username.encode() if cfg.username else None
        self.password = cfg.password.get_secret_value().encode() if cfg.password else None
        self.needs_client_cert = cfg.verify_client != "none"

    @property
    def configured(self) -> bool:
        return self.token is not None or (self.username is not None and self.password is not None)

    @property
    def challenges(self) -> list[str]:
        out = []
        if self.username is not None:
            out.append(REALM)
        if self.token is not None:
            out.append(BEARER_CHALLENGE)
        return out

    def address_allowed(self, remote: str | None) -> bool:
        return not self.allowlist or address_in(remote, self.allowlist)

    def credentials_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        raw = _header_bytes(value)
        if raw is None:
            return False
        if scheme == "bearer" and self.token is not None:
            return hmac.compare_digest(raw, self.token)
        if scheme == "basic" and self.username is not None and self.password is not None:
            try:
                decoded = base64.b64decode(raw, validate=True)
            except binascii.Error:
                return False
            user, sep, password = decoded.partition(b":")
            if not sep:
                return False
            # Compare both, always: no early exit that would tell which one was wrong.
            user_ok = hmac.compare_digest(user, self.username)
            password_ok = hmac.compare_digest(password, self.password)
            return user_ok and password_ok
        return False

    def check(self, *, remote: str | None, authorization: str | None, has_client_cert: bool) -> Denied | None:
        """None when the request may proceed."""
        if not self.address_allowed(remote):
            return Denied(403, f"client address {remote} is not in the api allowlist")
        if not self.configured:
            return Denied(403, "mutating API disabled: no api credentials configured")
        if self.needs_client_cert and not has_client_cert:
            return Denied(403, "a verified client certificate is required")
        key = client_key(remote)
        wait = self.throttle.retry_after(key)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            return Denied(429, "too many failed authentication attempts", retry_after=seconds)
        if not authorization:
            return Denied(401, "authentication required", challenge=True)
        if not self.credentials_ok(authorization):
            started = self.throttle.failed(key)
            return Denied(401, "invalid credentials", challenge=True, throttle_started=started)
        self.throttle.succeeded(key)
        return None


def server_ssl_context(cfg: ApiConfig) -> ssl.SSLContext | None:
    """The TLS context of the API, or None for plain HTTP."""
    if cfg.certfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.certfile), str(cfg.keyfile) if cfg.keyfile else None)
    if cfg.cafile is not None:
        ctx.load_verify_locations(cafile=str(cfg.cafile))
    ctx.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[cfg.verify_client]
    return ctx
