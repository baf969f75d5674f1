"""The chaos runner's exit status: a scenario it skipped fails the run unless accepted."""

from __future__ import annotations

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
