"""hakeeper.pg.upgrade's pure parts: pg_upgrade's output, initdb options, rollback rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakeeper.pg.errors import PgError
from hakeeper.pg.upgrade import (
    ClusterFacts,
    Method,
    UpgradeState,
    initdb_args,
    new_cluster_started,
    parse_pg_upgrade_output,
    rollback_link_upgrade,
    rollback_plan,
    split_libraries,
    vacuumdb_argv,
)

PAD = " " * 20

# Captured from pg_upgrade 18 (17 -> 18), shortened.
UPGRADE_OK = f"""Performing Consistency Checks
-----------------------------
Checking cluster versions{PAD}ok
Checking for prepared transactions{PAD}ok
Creating dump of database schemas{PAD}ok

Performing Upgrade
------------------
Restoring database schemas in the new cluster{PAD}ok
Adding ".old" suffix to old "global/pg_control"{PAD}ok

If you want to start the old cluster, you will need to remove
the ".old" suffix from "/tmp/x/old/global/pg_control.old".
Linking user relation files{PAD}ok

Upgrade Complete
----------------
Running this script will delete the old cluster's data files:
    ./delete_old_cluster.sh
"""

PREPARED = f"""Performing Consistency Checks on Old Live Server
------------------------------------------------
Checking cluster versions{PAD}ok
Checking for prepared transactions{PAD}
The source cluster contains prepared transactions
Failure, exiting
"""

LIBRARIES = f"""Checking data type usage{PAD}ok
Checking for presence of required libraries{PAD}fatal

Your installation references loadable libraries that are missing from the
new installation.  You can add these libraries to the new installation,
or remove the functions using them from the old installation.  A list of
problem libraries is in the file:
    /tmp/x/new/pg_upgrade_output.d/20261207T112600.404/loadable_libraries.txt
Failure, exiting
"""


def timed(text: str, step: float = 1.0) -> list[tuple[float, str]]:
    return [(i * step, line) for i, line in enumerate(text.splitlines())]


def test_successful_run_has_steps_with_seconds_and_no_problem() -> None:
    steps, problems = parse_pg_upgrade_output(timed(UPGRADE_OK))
    assert problems == []
    labels = [s.label for s in steps]
    assert labels == [
        "Checking cluster versions",
        "Checking for prepared transactions",
        "Creating dump of database schemas",
        "Restoring database schemas in the new cluster",
        'Adding ".old" suffix to old "global/pg_control"',
        "Linking user relation files",
    ]
    assert all(s.status == "ok" for s in steps)
    # each step's seconds run from the previous step's line to its own
    assert [s.seconds for s in steps] == [2.0, 1.0, 1.0, 4.0, 1.0, 4.0]


def test_failing_step_without_file() -> None:
    steps, problems = parse_pg_upgrade_output(timed(PREPARED))
    assert [s.status for s in steps] == ["ok", "failed"]
    assert len(problems) == 1
    assert problems[0].check == "Checking for prepared transactions"
    assert problems[0].text == "The source cluster contains prepared transactions"
    assert problems[0].log_file is None


def test_fatal_step_names_its_file() -> None:
    _, problems = parse_pg_upgrade_output(timed(LIBRARIES))
    assert len(problems) == 1
    p = problems[0]
    assert p.check == "Checking for presence of required libraries"
    assert p.text.startswith("Your installation references loadable libraries")
    assert p.log_file == Path("/tmp/x/new/pg_upgrade_output.d/20261207T112600.404/loadable_libraries.txt")


def test_failure_outside_a_step() -> None:
    text = (
        '\n*failure*\nConsult the last few lines of "/tmp/x/log/pg_upgrade_server.log" for\n'
        "Failure, exiting\n"
    )
    _, problems = parse_pg_upgrade_output(timed(text))
    assert len(problems) == 1 and problems[0].check == "pg_upgrade"
    assert "Consult the last few lines" in problems[0].text


def facts(checksums: bool, provider: str = "libc", locale: str | None = None) -> ClusterFacts:
    return ClusterFacts(
        data_dir=Path("/d"),
        bin_dir=Path("/b"),
        major=17,
        checksums=checksums,
        encoding="UTF8",
        locale_provider=provider,
        lc_collate="C",
        lc_ctype="C",
        provider_locale=locale,
        wal_segment_bytes=32 * 1024 * 1024,
        superuser="admin",
        shared_preload_libraries=(),
        prepared_xacts=(),
        logical_slots=(),
    )


def test_initdb_args_match_checksums_explicitly() -> None:
    assert "--no-data-checksums" in initdb_args(facts(False), 18)
    assert "--data-checksums" not in initdb_args(facts(False), 18)
    # 17's initdb has no --no-data-checksums, and its default is off
    assert not any("checksums" in a for a in initdb_args(facts(False), 17))
    on = initdb_args(facts(True), 18)
    assert "--data-checksums" in on and "--no-data-checksums" not in on
    assert {"--username=admin", "--encoding=UTF8", "--wal-segsize=32", "--lc-collate=C"} <= set(on)
    assert "--builtin-locale=C.UTF-8" in initdb_args(facts(True, "builtin", "C.UTF-8"), 18)


def test_rollback_plan() -> None:
    assert rollback_plan(Method.COPY, UpgradeState.NEW_STARTED).possible
    assert rollback_plan(Method.LINK, UpgradeState.DONE).possible
    assert "pg_control.old" in rollback_plan(Method.LINK, UpgradeState.FAILED).how
    assert not rollback_plan(Method.LINK, UpgradeState.NEW_STARTED).possible
    assert not rollback_plan(Method.SWAP, UpgradeState.DONE).possible
    assert rollback_plan(Method.SWAP, UpgradeState.NOT_RUN).possible


def test_rollback_link_upgrade(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "global").mkdir(parents=True)
    new.mkdir()
    with pytest.raises(PgError, match="does not exist"):
        rollback_link_upgrade(old, new_data_dir=new)
    (old / "global" / "pg_control.old").write_text("x")
    (new / "postmaster.opts").write_text(
        '/b/postgres "-D" "/new" "-p" "5" "-b" "-c" "vacuum_defer_cleanup_age=0"\n'
    )
    assert not new_cluster_started(new)
    (new / "postmaster.opts").write_text('/b/postgres "-D" "/new"\n')
    with pytest.raises(PgError, match="has been started"):
        rollback_link_upgrade(old, new_data_dir=new)
    assert (old / "global" / "pg_control.old").exists()
    (new / "postmaster.opts").unlink()
    rollback_link_upgrade(old, new_data_dir=new)
    assert (old / "global" / "pg_control").read_text() == "x"
    assert not (old / "global" / "pg_control.old").exists()


def test_split_libraries_and_vacuumdb() -> None:
    assert split_libraries('pg_stat_statements, "auto_explain",') == ("pg_stat_statements", "auto_explain")
    assert split_libraries("") == ()
    cmds = vacuumdb_argv(Path("/b"), 18, host="/s", port=5, user="u")
    assert cmds[0][-2:] == ["--analyze-in-stages", "--missing-stats-only"]
    assert vacuumdb_argv(Path("/b"), 17, host="/s", port=5, user="u")[0][-1] == "--analyze-in-stages"
