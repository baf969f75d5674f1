"""``hakeeper restore --jobs/--parallel/--delta``: the options reach RestoreOptions, --parallel
stays an alias of --jobs, and a --delta into a directory that holds no cluster is refused with
one line (exit 1, no traceback) before anything is planned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hakeeper.backup import restore as restore_mod
from hakeeper.backup.restore import RestoreOptions, RestoreResult
from hakeeper.cli import backup_cmds  # noqa: F401  (registers restore on the app)
from hakeeper.cli.app import app

runner = CliRunner()


def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "node.yml"
    p.write_text(
        json.dumps(
            {
                "scope": "s",
                "name": "n",
                "etcd": {"hosts": ["http://127.0.0.1:9"]},
                "postgresql": {
                    "data_dir": str(tmp_path / "d"),
                    "superuser": {"password": "su"},
                    "replication": {"password": "repl"},
                },
                "backup": {"repositories": [{"name": "fs1", "type": "fs", "path": str(tmp_path / "repo")}]},
            }
        )
    )
    return p


@pytest.mark.parametrize(
    ("args", "jobs", "delta"),
    [
        (["--jobs", "3"], 3, False),
        (["-j", "5"], 5, False),
        (["--parallel", "2"], 2, False),  # the old name
        (["--delta"], None, True),
    ],
)
def test_jobs_and_delta_reach_the_restore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], jobs: int | None, delta: bool
) -> None:
    seen: list[RestoreOptions] = []

    async def fake_restore(repo: Any, rc: Any, scope: str, opts: RestoreOptions) -> RestoreResult:
        seen.append(opts)
        return RestoreResult("b", "fs1", "latest", 1, str(opts.data_dir), 0, 0, False, delta=opts.delta)

    monkeypatch.setattr(restore_mod, "restore", fake_restore)
    monkeypatch.setattr("hakeeper.backup.delta.check_target", lambda d: 1)
    target = tmp_path / "target"
    res = runner.invoke(
        app,
        [
            "restore",
            "-c",
            str(cfg_file(tmp_path)),
            "-D",
            str(target),
            "--latest",
            "--no-switch-wal",
            *args,
            "-o",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(seen) == 1
    assert seen[0].delta is delta
    if jobs is not None:
        assert seen[0].parallel == jobs
    else:
        assert seen[0].parallel >= 1  # the CPU count
    assert json.loads(res.stdout)["delta"] is delta


def test_delta_into_a_directory_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    res = runner.invoke(
        app,
        [
            "restore",
            "-c",
            str(cfg_file(tmp_path)),
            "-D",
            str(target),
            "--latest",
            "--delta",
            "--no-switch-wal",
        ],
    )
    assert res.exit_code == 1, res.output
    assert "no readable global/pg_control" in res.output
    assert "Traceback" not in res.output


def test_jobs_below_one_is_a_usage_error(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["restore", "-c", str(cfg_file(tmp_path)), "-D", str(tmp_path / "t"), "--latest", "--jobs", "0"]
    )
    assert res.exit_code == 2
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "prefetch", "max_bytes"),
    [
        ([], 16, 512 << 20),
        (["--prefetch", "4", "--prefetch-max-mb", "64"], 4, 64 << 20),
        (["--prefetch-max-mb", "0"], 16, 0),  # nothing fits: no prefetch (the planner's rule)
    ],
)
def test_prefetch_and_its_bound_reach_the_restore(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], prefetch: int, max_bytes: int
) -> None:
    seen: list[RestoreOptions] = []

    async def fake_restore(repo: Any, rc: Any, scope: str, opts: RestoreOptions) -> RestoreResult:
        seen.append(opts)
        return RestoreResult("b", "fs1", "latest", 1, str(opts.data_dir), 0, 0, False)

    monkeypatch.setattr(restore_mod, "restore", fake_restore)
    cmd = ["restore", "-c", str(cfg_file(tmp_path)), "-D", str(tmp_path / "t"), "--latest", "--no-switch-wal"]
    res = runner.invoke(app, [*cmd, *args, "-o", "json"])
    assert res.exit_code == 0, res.output
    assert (seen[0].prefetch, seen[0].prefetch_max_bytes) == (prefetch, max_bytes)


def test_a_negative_prefetch_bound_is_a_usage_error(tmp_path: Path) -> None:
    cmd = ["restore", "-c", str(cfg_file(tmp_path)), "-D", str(tmp_path / "t"), "--latest"]
    res = runner.invoke(app, [*cmd, "--prefetch-max-mb", "-1"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
