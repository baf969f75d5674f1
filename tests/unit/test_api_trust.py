"""The CLI sends requests (and the operator's API credentials) only to member API URLs it can
trust independently of etcd (finding 3 of issue 12)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hakeeper.cli.api_trust import ApiTrust, normalize_api_url
from hakeeper.core.config import ApiClientConfig, EtcdConfig


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.1:8008", "http://10.0.0.1:8008"),
        ("HTTP://Node1.Example.COM:8008/", "http://node1.example.com:8008"),
        ("https://db1.example.com", "https://db1.example.com:443"),
        ("http://db1", "http://db1:80"),
        ("http://[::1]:8008", "http://[::1]:8008"),
        ("https://10.0.0.1:8008/some/path", "https://10.0.0.1:8008"),
        ("ftp://10.0.0.1:8008", None),
        ("10.0.0.1:8008", None),
        ("http://user:pw@10.0.0.1:8008", None),
        ("http://10.0.0.1:99999", None),
        ("http://", None),
    ],
)
def test_normalize(url: str, expected: str | None) -> None:
    assert normalize_api_url(url) == expected


def _node1() -> ApiTrust:
    return ApiTrust.make(
        own_name="node1",
        own_url="http://10.0.0.11:8008",
        urls=["http://10.0.0.12:8008", "HTTP://10.0.0.13:8008/"],
        source="/etc/hakeeper/node1.yml",
    )


def test_own_api_and_listed_urls_are_trusted() -> None:
    t = _node1()
    assert t.refusal("node1", "http://10.0.0.11:8008") is None
    assert t.refusal("node1", "http://10.0.0.11:8008/") is None
    assert t.refusal("node2", "http://10.0.0.12:8008") is None
    assert t.refusal("node3", "http://10.0.0.13:8008") is None


def test_redirected_url_is_refused_with_member_url_and_remedy() -> None:
    reason = _node1().refusal("node2", "http://203.0.113.9:8008")
    assert reason is not None
    assert "node2" in reason and "http://203.0.113.9:8008" in reason
    assert "--api-url http://203.0.113.9:8008" in reason
    assert "api.client.urls of /etc/hakeeper/node1.yml" in reason


def test_own_url_is_trusted_only_for_own_name() -> None:
    # node1's address is trusted as node1's; another member claiming it is a sign of tampering
    # only when it is not also listed -- the own-node rule itself is tied to the name.
    t = ApiTrust.make(own_name="node1", own_url="http://10.0.0.11:8008")
    assert t.refusal("node1", "http://10.0.0.11:8008") is None
    assert t.refusal("node2", "http://10.0.0.11:8008") is not None


def test_same_host_other_port_or_scheme_is_not_the_same_url() -> None:
    t = _node1()
    assert t.refusal("node2", "http://10.0.0.12:8009") is not None
    assert t.refusal("node2", "https://10.0.0.12:8008") is not None


def test_https_is_trusted_only_with_a_pinned_ca() -> None:
    unpinned = ApiTrust.make(own_name="node1", own_url="https://10.0.0.11:8008")
    assert unpinned.refusal("node2", "https://db2.example.com:8008") is not None
    pinned = ApiTrust.make(own_name="node1", own_url="https://10.0.0.11:8008", ca_pinned=True)
    assert pinned.refusal("node2", "https://db2.example.com:8008") is None
    # The pinned CA protects only TLS: a plain http URL gains nothing from it.
    assert pinned.refusal("node2", "http://db2.example.com:8008") is not None


def test_urls_the_cli_never_uses_are_refused_even_when_listed() -> None:
    t = ApiTrust.make(urls=["http://10.0.0.12:8008"], ca_pinned=True)
    for bad in ("http://x:y@10.0.0.12:8008", "file:///etc/passwd", "10.0.0.12:8008", ""):
        reason = t.refusal("node2", bad)
        assert reason is not None and "node2" in reason


def test_nothing_configured_trusts_nothing() -> None:
    t = ApiTrust()
    reason = t.refusal("node1", "http://127.0.0.1:8008")
    assert reason is not None and "api.client.urls of the node file" in reason


def test_api_client_config_refuses_credentials_and_other_schemes() -> None:
    assert ApiClientConfig(urls=["https://db1:8008"]).urls == ["https://db1:8008"]
    for bad in ("http://u:p@db1:8008", "db1:8008", "ftp://db1"):
        with pytest.raises(ValidationError):
            ApiClientConfig(urls=[bad])
    with pytest.raises(ValidationError, match="keyfile needs certfile"):
        ApiClientConfig.model_validate({"keyfile": "/k.pem"})


@pytest.mark.parametrize(
    "host",
    ["http://root:secret@10.0.0.1:2379", "https://user@etcd1:2379", "hakeeper:pw@10.0.0.1:2379"],
)
def test_etcd_urls_with_credentials_are_refused(host: str) -> None:
    with pytest.raises(ValidationError) as exc:
        EtcdConfig(hosts=[host])
    text = str(exc.value)
    assert "must not carry credentials" in text
    assert "secret" not in text.replace(host, "")  # the message itself adds no secret


def test_etcd_urls_without_credentials_still_pass() -> None:
    cfg = EtcdConfig(hosts=["https://etcd1:2379", "10.0.0.2:2379", "http://[::1]:2379/"])
    assert cfg.hosts == ["https://etcd1:2379", "http://10.0.0.2:2379", "http://[::1]:2379"]
