"""``backup.compress_on``: who compresses the base backups a node takes (schedules, the agent's
own backups, ``backup create`` without ``--compress-on``); a bad value names the file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hakeeper.backup import source
from hakeeper.backup.basebackup import Endpoint
from hakeeper.core.config import ConfigError, load_node_config
from tests.unit.test_config import GOOD, write


async def _options_used(cfg_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    seen: dict[str, Any] = {}

    async def fake_create_backup(repo: Any, **options: Any) -> Any:
        seen.update(options)
        return "record"

    monkeypatch.setattr(source, "create_backup", fake_create_backup)
    cfg = load_node_config(write(tmp_path, cfg_text))
    ep = Endpoint("node1", "127.0.0.1", 6000)
    rec: object = await source.backup_node(
        object(),  # type: ignore[arg-type]
        cfg,
        source.SourceChoice(ep, ep, "the primary"),
        bin_dir=tmp_path,
        **kw,
    )
    assert rec == "record"
    return seen["compress_on"]


async def test_node_backups_follow_the_node_files_compress_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await _options_used(GOOD, tmp_path, monkeypatch) == "server"  # the default
    client = GOOD + "backup:\n  compress_on: client\n"
    assert await _options_used(client, tmp_path, monkeypatch) == "client"
    # an explicit choice (backup create --compress-on) wins over the file
    assert await _options_used(client, tmp_path, monkeypatch, compress_on="server") == "server"


def test_a_bad_compress_on_names_the_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "backup:\n  compress_on: both\n")
    with pytest.raises(ConfigError) as e:
        load_node_config(path)
    assert "backup.compress_on" in str(e.value) and str(path) in str(e.value)
