"""The bootstrap marker file (hakeeper/ha/bootmark.py): private, durable, read back by the next
agent; an unreadable one proves nothing; a leftover initdb is found by its data directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from hakeeper.ha import bootmark
from hakeeper.ha.bootmark import BootstrapFile, BootstrapMark, Phase, initdb_running, made_during
from hakeeper.ha.policy.decision import BootstrapLeft


def test_the_marker_is_private_and_read_back_by_the_next_agent(tmp_path: Path) -> None:
    path = tmp_path / bootmark.MARKER_NAME
    data_dir = tmp_path / "data"
    record = BootstrapFile(path)
    assert record.current is None

    mark = bootmark.begin(record, data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BootstrapFile(path).current == mark == BootstrapMark(Phase.INITDB, str(data_dir), mark.started_at)
    assert bootmark.leftover(BootstrapFile(path), data_dir) == BootstrapLeft(None, won=False)

    bootmark.advance(record, mark, Phase.RACE, "7300000000000000001")
    again = BootstrapFile(path)  # the restarted agent's
    assert bootmark.leftover(again, data_dir) == BootstrapLeft("7300000000000000001", won=False)
    assert bootmark.leftover(again, tmp_path / "other") is None, "it names another directory"

    again.clear()
    assert not path.exists() and BootstrapFile(path).current is None
    again.clear()  # nothing to remove: no error


def test_a_marker_is_read_when_first_asked_for_and_only_if_the_agent_s_user_owns_it(tmp_path: Path) -> None:
    path = tmp_path / bootmark.MARKER_NAME
    record = BootstrapFile(path)  # made before the agent took its runtime directory
    mark = BootstrapMark(Phase.RACE, "/d", 1.0, "7300000000000000001")
    path.write_text(mark.to_json())
    assert record.current == mark
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # nobody's: someone else wrote it
        assert BootstrapFile(path).current is None


def test_an_unreadable_marker_proves_nothing(tmp_path: Path) -> None:
    path = tmp_path / bootmark.MARKER_NAME
    path.write_text('{"phase": "initdb"')
    assert BootstrapFile(path).current is None
    path.write_text('{"phase": "later", "data_dir": "/d", "started_at": 1}')
    assert BootstrapFile(path).current is None
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(
        BootstrapMark(Phase.INITDB, "/d", 1.0).to_json()
    )  # a link planted in its place is not followed
    assert BootstrapFile(path).current is None


def test_an_initdb_left_running_is_found_by_its_data_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert initdb_running(data_dir) is None
    # a process whose argv is what our initdb's is: "initdb -D <data_dir> ..."
    proc = subprocess.Popen(
        ["bash", "-c", f'exec -a initdb {sys.executable} -c "import time; time.sleep(30)" -D {data_dir}']
    )
    try:
        deadline = time.monotonic() + 10
        while initdb_running(data_dir) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert initdb_running(data_dir) == proc.pid
        assert initdb_running(tmp_path / "other") is None
    finally:
        proc.kill()
        proc.wait()
    assert initdb_running(data_dir) is None


def test_a_directory_is_that_initdb_s_only_if_its_pg_version_dates_from_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    started = time.time()
    assert not made_during(data_dir, started), "no PG_VERSION"
    version = data_dir / "PG_VERSION"
    version.write_text("15\n")
    assert made_during(data_dir, started)
    assert made_during(data_dir, started + 30), "a small step of the wall clock"
    os.utime(version, (started + 3 * 3600, started + 3 * 3600))  # put there hours later
    assert not made_during(data_dir, started)
    os.utime(version, (started - 86400, started - 86400))  # a restored backup's old file
    assert not made_during(data_dir, started)
    version.unlink()
    (tmp_path / "elsewhere").write_text("15\n")
    version.symlink_to(tmp_path / "elsewhere")
    assert not made_during(data_dir, started), "a link is not followed"
