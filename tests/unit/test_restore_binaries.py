"""A restore that will run PostgreSQL's programs checks the binaries before copying anything."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from hakeeper.backup.catalog import (
    COMBINE_IN_PLACE,
    COMBINE_TOOL,
    BackupRecord,
    BackupStatus,
    RestoreRefused,
    Target,
)
from hakeeper.backup.restore import RestoreOptions, _check_binaries_for
from hakeeper.core.config import Credentials
from hakeeper.util.proc import RunAs

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def bin_dir(tmp_path: Path, version: str, tools: tuple[str, ...] = ()) -> Path:
    d = tmp_path / f"bin-{version}"
    d.mkdir()
    pg = d / "postgres"
    pg.write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
    pg.chmod(0o755)
    for t in tools:
        (d / t).write_text("#!/bin/sh\n")
        (d / t).chmod(0o755)
    return d


def rec(bid: str, version: int, parent: str | None = None) -> BackupRecord:
    return BackupRecord(
        id=bid,
        label=bid,
        kind="incremental" if parent else "full",
        parent=parent,
        chain_root="A" if parent else None,
        status=BackupStatus.COMPLETE,
        scope="s",
        repository="r",
        pg_version=version,
        start_time=T0,
        updated_at=T0,
    )


def opts(d: Path, *, start: bool, combine: str = COMBINE_IN_PLACE) -> RestoreOptions:
    return RestoreOptions(
        data_dir=d / "data",
        target=Target("latest"),
        bin_dir=d,
        run_as=RunAs(),
        superuser=Credentials(username="postgres"),
        start=start,
        combine=combine,
    )


def test_binaries_of_another_major_are_refused_before_a_start(tmp_path: Path) -> None:
    b15 = bin_dir(tmp_path, "15.10")
    chain = [rec("A", 180006), rec("B", 180006, "A")]
    with pytest.raises(RestoreRefused, match=r"is of PostgreSQL 18, the binaries .* are 15\.10"):
        _check_binaries_for(chain, opts(b15, start=True))
    _check_binaries_for(chain, opts(b15, start=False))  # a copy alone (in place) runs none


def test_a_chain_for_pg_combinebackup_needs_the_tools(tmp_path: Path) -> None:
    chain = [rec("A", 170010), rec("B", 170010, "A")]
    bare = bin_dir(tmp_path, "17.10")
    with pytest.raises(RestoreRefused, match="pg_combinebackup is not in"):
        _check_binaries_for(chain, opts(bare, start=False, combine=COMBINE_TOOL))
    full = bin_dir(tmp_path, "17.9", ("pg_combinebackup", "pg_verifybackup"))
    _check_binaries_for(chain, opts(full, start=True, combine=COMBINE_TOOL))
    _check_binaries_for([rec("A", 170010)], opts(bare, start=False, combine=COMBINE_TOOL))  # no chain


def test_binaries_that_do_not_run_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RestoreRefused, match="cannot be used"):
        _check_binaries_for([rec("A", 170010)], opts(tmp_path, start=True))
