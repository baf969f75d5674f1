"""Who may call the mutating endpoints, and the TLS context of the API.

Order of the checks (the first failing one answers):

1. the client address must be in ``api.allowlist`` (when one is set)            -> 403
2. the node must have credentials configured (token or username/password)      -> 403
3. with ``verify_client`` optional/required, a verified client certificate      -> 403
4. a matching ``Authorization: Bearer <token>`` or ``Basic`` header             -> 401

Secrets are compared with :func:`hmac.compare_digest` and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import ssl
from dataclasses import dataclass

from hakeeper.core.config import ApiConfig

REALM = 'Basic realm="hakeeper", charset="UTF-8"'
BEARER_CHALLENGE = 'Bearer realm="hakeeper"'

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Denied:
    status: int  # 401 or 403
    message: str
    challenge: bool = False  # send WWW-Authenticate


class Authenticator:
    def __init__(self, cfg: ApiConfig) -> None:
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
        if not self.allowlist:
            return True
        if remote is None:
            return False
        try:
            addr = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allowlist)

    def credentials_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if scheme == "bearer" and self.token is not None:
            return hmac.compare_digest(value.encode(), self.token)
        if scheme == "basic" and self.username is not None and self.password is not None:
            try:
                decoded = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
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
        if not authorization:
            return Denied(401, "authentication required", challenge=True)
        if not self.credentials_ok(authorization):
            return Denied(401, "invalid credentials", challenge=True)
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
