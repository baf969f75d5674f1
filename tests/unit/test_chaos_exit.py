"""The chaos runner's exit status: a scenario it skipped fails the run unless accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chaos.__main__ import _finish, main
from chaos.scenarios import SCENARIOS, SMOKE


def rep(name: str, passed: bool | None) -> dict[str, Any]:
    """A report as the runner writes it: a run's, or a skipped scenario's."""
    if passed is None:
        return {
            "scenario": name,
            "mode": "sync",
            "skipped": "needs network namespaces (no ip command)",
            "passed": None,
        }
    return {
        "scenario": name,
        "mode": "sync",
        "net": "netns",
        "rto_s": 4.0,
        "write_outage_s": 4.1,
        "lost_count": 0,
        "lost_bytes": 0,
        "dual_primary": [],
        "unknown": 0,
        "refusals": 0,
        "writer": {"ok": 10, "failed": 0, "unknown": 0},
        "probe_acks": 5,
        "violations": [] if passed else ["acknowledged write lost"],
        "passed": passed,
    }


def test_a_skipped_scenario_fails_the_run_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = [rep("kill-both", True), rep("partition-all", None)]
    assert _finish(reports, tmp_path) == 1
    err = capsys.readouterr().err
    assert "skipped: partition-all (sync): needs network namespaces (no ip command)" in err
    assert "--allow-skips" in err


def test_allow_skips_accepts_a_partial_run_but_not_a_failure_or_an_empty_one(tmp_path: Path) -> None:
    assert _finish([rep("kill-both", True), rep("partition-all", None)], tmp_path, allow_skips=True) == 0
    assert _finish([rep("kill-both", False), rep("partition-all", None)], tmp_path, allow_skips=True) == 1
    assert _finish([rep("partition-all", None)], tmp_path, allow_skips=True) == 1


def test_every_run_passed_is_0_and_a_failure_is_1(tmp_path: Path) -> None:
    assert _finish([rep("kill-both", True), rep("double-fault", True)], tmp_path) == 0
    assert _finish([rep("kill-both", True), rep("double-fault", False)], tmp_path) == 1


def test_the_smoke_set_holds_a_partition_scenario_and_accepts_the_flag() -> None:
    # The smoke set is where a silent skip hurt: it includes the split-brain partition scenario.
    assert any(SCENARIOS[n].partition for n in SMOKE)
    with pytest.raises(SystemExit) as e:
        main(["smoke", "--allow-skips", "--runs", "0"])
    assert e.value.code == 2  # parsed the flag, then refused --runs 0 as a usage error


class _FakeRunner:
    """Stands in for chaos.runner.Runner: records what main() asked for, runs nothing."""

    made: list[tuple[str, int | None]] = []
    planned: list[list[str]] = []

    def __init__(self, mode: str, out: Path, **kw: Any) -> None:
        self.mode = mode
        self.pg_version = kw["pg_version"]
        _FakeRunner.made.append((mode, kw["pg_version"]))

    def execute(self, plans: list[Any]) -> list[dict[str, Any]]:
        _FakeRunner.planned.append([p.scenario.name for p in plans])
        return [{**rep(p.scenario.name, True), "pg_version": self.pg_version} for p in plans]


def test_smoke_runs_only_the_given_scenarios_on_the_given_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("chaos.__main__.Runner", _FakeRunner)
    _FakeRunner.made, _FakeRunner.planned = [], []
    argv = ["smoke", "--pg-version", "17", "--scenarios", "kill-both,partition-all", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert _FakeRunner.made == [("sync", 17)]
    assert _FakeRunner.planned == [["kill-both", "partition-all"]]
    assert "2 runs on PostgreSQL 17, 0 failed" in capsys.readouterr().out
    # without --pg-version: $TEST_PG_VERSION, else 15
    monkeypatch.setenv("TEST_PG_VERSION", "18")
    assert main(["smoke", "--scenarios", "kill-both", "--out", str(tmp_path)]) == 0
    monkeypatch.delenv("TEST_PG_VERSION")
    assert main(["smoke", "--scenarios", "kill-both", "--out", str(tmp_path)]) == 0
    assert [v for _, v in _FakeRunner.made[1:]] == [18, 15]


@pytest.mark.parametrize(
    "argv",
    [
        ["smoke", "--scenarios", "kill-both,no-such-scenario"],
        ["smoke", "--scenarios", "kill-postgres"],  # a scenario, but not one of the smoke
        ["smoke", "--scenarios", ","],
        ["smoke", "--pg-version", "16"],
        ["run", "kill-both", "--pg-version", "14"],
    ],
)
def test_a_scenario_outside_the_smoke_or_an_unsupported_major_is_a_usage_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chaos.__main__.Runner", _FakeRunner)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_an_unsupported_test_pg_version_is_refused_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("chaos.__main__.Runner", _FakeRunner)
    monkeypatch.setenv("TEST_PG_VERSION", "16")
    assert main(["smoke", "--scenarios", "kill-both", "--out", str(tmp_path)]) == 2
    assert "TEST_PG_VERSION='16'" in capsys.readouterr().err


def test_summarize_failures_names_each_failed_run_and_a_run_that_could_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `make chaos-smoke` prints last when it fails: the CI log's tail says why."""
    ok, bad = tmp_path / "smoke", tmp_path / "smoke-pg17"
    ok.mkdir()
    bad.mkdir()
    (ok / "kill-both-sync-001.json").write_text(json.dumps({**rep("kill-both", True), "pg_version": 15}))
    failed = {**rep("double-fault", False), "pg_version": 17, "run": 1, "cluster_dir": "/tmp/c1"}
    (bad / "double-fault-sync-001.json").write_text(json.dumps(failed))
    (bad / "error.txt").write_text("a new chaos cluster did not become ready: node2 not streaming\n")
    assert main(["summarize", "--failures", str(ok), str(bad)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "FAILED double-fault [sync] PostgreSQL 17 run 1: acknowledged write lost (logs: /tmp/c1)",
        f"{bad}: did not run: a new chaos cluster did not become ready: node2 not streaming",
    ]
    assert main(["summarize", "--failures", str(ok)]) == 0
    assert capsys.readouterr().out.strip() == f"no failed run in {ok}"
