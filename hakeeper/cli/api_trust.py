"""Which member API URLs the CLI may send a request (and the operator's API credentials) to.

A member's ``api_url`` comes from its member key in etcd, and anyone who can write etcd can
point it elsewhere.  So the CLI uses a URL only when it can trust it independently of etcd:

* it is this node's own API (``-c node.yml``: the member of that name at the address the file
  configures);
* it is listed in ``api.client.urls`` of the node file or given with ``--api-url``;
* it is ``https://`` and a CA is pinned (``api.client.cafile``): the TLS handshake then checks
  the certificate against that CA *and* the host name in the URL, so a URL redirected to another
  host fails unless that host holds a certificate of the cluster's own CA.

Everything else is refused with the member, the URL and how to allow it.  Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["ApiTrust", "normalize_api_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_api_url(url: str) -> str | None:
    """``scheme://host:port`` (lower-case, explicit port, IPv6 in brackets), or None for a URL
    the CLI never uses: not http(s), no host, credentials in it, a bad port."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    host = parts.hostname.lower()
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


@dataclass(frozen=True, slots=True)
class ApiTrust:
    """What the CLI was told to trust.  ``source`` names where trusted URLs can be added (the
    node file), for the refusal message."""

    own_name: str | None = None
    own_url: str | None = None
    urls: frozenset[str] = field(default_factory=frozenset)  # normalized
    ca_pinned: bool = False
    source: str | None = None

    @classmethod
    def make(
        cls,
        *,
        own_name: str | None = None,
        own_url: str | None = None,
        urls: tuple[str, ...] | list[str] = (),
        ca_pinned: bool = False,
        source: str | None = None,
    ) -> ApiTrust:
        normalized = frozenset(n for n in (normalize_api_url(u) for u in urls) if n is not None)
        return cls(own_name, own_url, normalized, ca_pinned, source)

    def refusal(self, member: str, url: str) -> str | None:
        """None when ``member``'s API at ``url`` may be used; else why not and how to allow it."""
        norm = normalize_api_url(url)
        if norm is None:
            return f"{member}'s API address {url!r} from etcd is not an http(s)://host:port URL"
        if norm in self.urls:
            return None
        if (
            self.own_name is not None
            and member == self.own_name
            and self.own_url is not None
            and norm == normalize_api_url(self.own_url)
        ):
            return None
        if self.ca_pinned and norm.startswith("https://"):
            return None
        where = f"api.client.urls of {self.source}" if self.source else "api.client.urls of the node file"
        return (
            f"refusing to send the request to {member}'s API at {url}: that address comes from "
            f"etcd and matches nothing configured here (this node's own API, {where}, or an "
            "https:// URL verified against api.client.cafile).  If the address is right, allow it "
            f"with --api-url {url} or add it to {where}"
        )
