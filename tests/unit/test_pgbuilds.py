"""Which PostgreSQL major a local cluster runs, and where its binaries come from."""

from __future__ import annotations

import subprocess

import pytest

from hakeeper.localcluster import LocalClusterError, pgbuilds


def test_default_is_15_and_the_environment_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pgbuilds.ENV_VAR, raising=False)
    assert pgbuilds.default_major() == 15
    monkeypatch.setenv(pgbuilds.ENV_VAR, "18")
    assert pgbuilds.default_major() == 18


@pytest.mark.parametrize("raw", ["16", "abc", "14"])
def test_unsupported_majors_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(pgbuilds.ENV_VAR, raw)
    with pytest.raises(LocalClusterError, match="15, 17, 18"):
        pgbuilds.default_major()


@pytest.mark.parametrize("major", pgbuilds.SUPPORTED_MAJORS)
def test_each_supported_major_has_its_binaries(major: int) -> None:
    """The pinned builds are installed by `make setup` and are the major they claim."""
    out = subprocess.run(
        [pgbuilds.pg_program("postgres", major), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(f"postgres (PostgreSQL) {major}."), out
    for tool in ("pg_basebackup", "pg_rewind", "pg_combinebackup", "pg_walsummary", "pg_verifybackup"):
        if major == 15 and tool in ("pg_combinebackup", "pg_walsummary"):
            continue  # new in 17
        assert (pgbuilds.bin_dir(major) / tool).is_file(), tool
