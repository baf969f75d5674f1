"""An incremental backup of a standby (basebackup._standby_past_parent): a CHECKPOINT on the
primary only when the standby's last restartpoint is not past the parent's end, then a wait
until the standby has replayed it; never fatal.  The SQL is faked here; the integration test
(test_backup_incremental_paths.py) runs it against real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hakeeper.backup import basebackup
from hakeeper.backup.basebackup import BackupError, Endpoint
from hakeeper.core.config import Credentials
from tests.unit.test_backup_chain import rec

STANDBY = Endpoint("node2", "127.0.0.1", 5433)
PRIMARY = Endpoint("node1", "127.0.0.1", 5432)
SU = Credentials(username="postgres")
PARENT = rec("20261207T060000Z", 1)  # stop LSN 2 * 16 MiB + 0x100


class FakeServers:
    """Answers basebackup.query: the standby's redo point, the primary's checkpoint, the
    standby's replay position (advancing by ``step`` per question)."""

    def __init__(self, redo: int, checkpoint: int, replay: int, step: int = 0) -> None:
        self.redo, self.checkpoint, self.replay, self.step = redo, checkpoint, replay, step
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, ep: Endpoint, creds: Credentials, sql: str, timeout: float = 15.0) -> list[Any]:
        self.calls.append((ep.name, sql))
        if sql == "CHECKPOINT":
            return []
        if "redo_lsn" in sql:
            return [(self.redo,)]
        if "checkpoint_lsn" in sql:
            return [(self.checkpoint,)]
        if "pg_last_wal_replay_lsn" in sql:
            self.replay += self.step
            return [(self.replay,)]
        raise AssertionError(sql)


def run(fake: FakeServers, monkeypatch: pytest.MonkeyPatch, primary: Endpoint | None = PRIMARY) -> None:
    monkeypatch.setattr(basebackup, "query", fake)
    asyncio.run(basebackup._standby_past_parent(STANDBY, primary, SU, PARENT, timeout=1.0))


def test_nothing_runs_when_the_restartpoint_is_past_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeServers(redo=PARENT.stop_lsn_int + 1, checkpoint=0, replay=0)
    run(fake, monkeypatch)
    assert [n for n, _ in fake.calls] == ["node2"]  # one look at the standby, no CHECKPOINT


def test_a_checkpoint_on_the_primary_then_a_wait_for_its_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    cp = PARENT.stop_lsn_int + 0x1000
    fake = FakeServers(redo=PARENT.start_lsn_int, checkpoint=cp, replay=cp - 0x300, step=0x100)
    run(fake, monkeypatch)
    assert ("node1", "CHECKPOINT") in fake.calls
    assert fake.replay > cp  # it waited until the standby replayed past the checkpoint record


def test_no_primary_or_no_replay_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeServers(redo=PARENT.start_lsn_int, checkpoint=PARENT.stop_lsn_int + 0x1000, replay=0)
    run(fake, monkeypatch, primary=None)  # logged; the incremental then fails and becomes a full
    assert ("node1", "CHECKPOINT") not in fake.calls
    run(fake, monkeypatch)  # the standby never replays it: gives up after the timeout
    assert ("node1", "CHECKPOINT") in fake.calls


def test_a_failing_query_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(ep: Endpoint, creds: Credentials, sql: str, timeout: float = 15.0) -> list[Any]:
        raise BackupError(f"{ep.name}: connection refused")

    monkeypatch.setattr(basebackup, "query", broken)
    asyncio.run(basebackup._standby_past_parent(STANDBY, PRIMARY, SU, PARENT, timeout=1.0))
