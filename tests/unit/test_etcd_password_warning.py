"""L6 of the security review: etcd password authentication over http:// is logged once."""

from __future__ import annotations

from typing import Any

import pytest

from hakeeper.dcs import etcd as etcd_mod
from hakeeper.dcs.etcd import EtcdClient


class _Recorder:
    """Stands in for the module's logger (structlog may have cached the real one already)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return record


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    monkeypatch.setattr(etcd_mod, "_plain_password_warned", set())
    recorder = _Recorder()
    monkeypatch.setattr(etcd_mod, "log", recorder)
    return recorder


def _warnings(rec: _Recorder) -> list[tuple[str, str, dict[str, Any]]]:
    return [e for e in rec.events if e[1] == "etcd_password_unencrypted"]


def test_password_over_http_warns_once_without_the_password(rec: _Recorder) -> None:
    EtcdClient(["http://10.0.0.1:2379", "https://10.0.0.2:2379"], username="hk", password="s3cr3t-pw")
    EtcdClient(["http://10.0.0.1:2379"], username="hk", password="s3cr3t-pw")
    events = _warnings(rec)
    assert len(events) == 1
    level, _, kw = events[0]
    assert level == "warning"
    assert kw["endpoints"] == ["http://10.0.0.1:2379"]
    assert "s3cr3t-pw" not in repr(rec.events)


def test_no_warning_over_https_or_without_a_password(rec: _Recorder) -> None:
    EtcdClient(["https://10.0.0.1:2379"], username="hk", password="pw")
    EtcdClient(["http://10.0.0.1:2379"])
    assert _warnings(rec) == []
