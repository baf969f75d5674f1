"""Pure parts of the agent API: sizes, health-check queries, If-Match, authentication."""

from __future__ import annotations

import base64

import pytest

from hakeeper.api.auth import Authenticator
from hakeeper.api.health import (
    HealthQuery,
    NodeFacts,
    QueryError,
    check_primary,
    check_replica,
    parse_query,
    parse_size,
)
from hakeeper.api.responses import ApiError
from hakeeper.api.server import parse_if_match
from hakeeper.core.config import ApiConfig


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("16MB", 16 << 20), ("1kB", 1024), ("2 GiB", 2 << 30), ("1.5k", 1536)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "-1", "1e3", " 1", "1XB", "\u0661"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_query() -> None:
    q = parse_query({"lag": "1MB", "tag_nosync": "true", "tag_failover_priority": "2"}, allow_lag=True)
    assert q == HealthQuery(lag=1 << 20, tags={"nosync": True, "failover_priority": 2})
    for bad in ({"lag": "1"}, {"tag_nosync": "yes"}, {"tag_colour": "red"}, {"colour": "red"}):
        with pytest.raises(QueryError):
            parse_query(bad, allow_lag=False)


def facts(**kw: object) -> NodeFacts:
    base: dict[str, object] = dict(
        name="n1", pg_running=True, in_recovery=True, streaming=True, writable_leader=False,
        holds_leader_key=False, lag=0, tags={"nofailover": False, "noloadbalance": False},
        loop_age=0.1, loop_limit=10, maximum_lag_on_failover=1 << 20,
    )  # fmt: skip
    base.update(kw)
    return NodeFacts(**base)  # type: ignore[arg-type]


def test_checks() -> None:
    assert check_replica(facts(), HealthQuery())[0]
    assert not check_replica(facts(streaming=False), HealthQuery())[0]
    assert not check_replica(facts(tags={"noloadbalance": True}), HealthQuery())[0]
    assert not check_replica(facts(lag=10), HealthQuery(lag=5))[0]
    assert not check_replica(facts(lag=None), HealthQuery(lag=5))[0]
    assert check_primary(facts(in_recovery=False, writable_leader=True))[0]
    ok, why = check_primary(facts(in_recovery=False, holds_leader_key=True))
    assert not ok and why and "read-only" in why


def test_if_match() -> None:
    assert parse_if_match(None) is None
    assert parse_if_match("12") == parse_if_match('"12"') == parse_if_match('W/"12"') == 12
    for bad in ("x", " 12", "*", "1" * 30):
        with pytest.raises(ApiError):
            parse_if_match(bad)


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_authenticator() -> None:
    a = Authenticator(ApiConfig(username="u", password="p", token="t", allowlist=["10.0.0.0/8", "::1"]))
    ok = {"remote": "10.1.2.3", "has_client_cert": False}
    assert a.check(authorization="Bearer t", **ok) is None  # type: ignore[arg-type]
    assert a.check(authorization=basic("u", "p"), **ok) is None  # type: ignore[arg-type]
    assert a.check(authorization=None, **ok).status == 401  # type: ignore[arg-type, union-attr]
    assert a.check(authorization=basic("u", "x"), **ok).status == 401  # type: ignore[arg-type, union-attr]
    assert a.check(authorization="Bearer t", remote="192.0.2.1", has_client_cert=False).status == 403  # type: ignore[union-attr]
    assert a.check(authorization="Bearer t", remote="::ffff:10.0.0.1", has_client_cert=False) is None
    none = Authenticator(ApiConfig())
    d = none.check(authorization="Bearer t", remote="127.0.0.1", has_client_cert=False)
    assert d is not None and d.status == 403 and "no api credentials" in d.message
    tls = ApiConfig(token="t", certfile="/x.crt", cafile="/ca.crt", verify_client="optional")
    d = Authenticator(tls).check(authorization="Bearer t", remote="127.0.0.1", has_client_cert=False)
    assert d is not None and d.status == 403


def test_replay_lag_of_a_caught_up_standby_is_zero_not_unknown() -> None:
    from hakeeper.core.pgtypes import ReplicaInfo

    def row(**kw: object) -> ReplicaInfo:
        base: dict[str, object] = {
            "application_name": "n2",
            "state": "streaming",
            "sync_state": "async",
            "sent_lsn": 100,
            "write_lsn": 100,
            "flush_lsn": 100,
            "replay_lsn": 100,
            "replay_lag": None,
        }
        base.update(kw)
        return ReplicaInfo(**base)  # type: ignore[arg-type]

    assert row().replay_lag_seconds == 0.0
    assert row(replay_lag=1.5).replay_lag_seconds == 1.5
    assert row(replay_lsn=90).replay_lag_seconds is None  # behind, and PostgreSQL has no figure yet
    assert row(state="catchup").replay_lag_seconds is None
