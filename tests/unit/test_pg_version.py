"""The PostgreSQL major of the binaries and of a data directory, the agent's refusal to run one
with the other, and each member's server version in its record, `list` and the metrics
(issue 14, items 1 and 2)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hakeeper.api.status import cluster_status, node_status
from hakeeper.cli.cluster_cmds import list_document, members_table
from hakeeper.cli.demo_cmd import _choose_major, _existing_major
from hakeeper.core.cluster import ClusterView, Member
from hakeeper.core.config import PostgresConfig
from hakeeper.core.pgtypes import LocalState
from hakeeper.core.records import InvalidRecord
from hakeeper.ha.metrics import HaMetrics, _version_num
from hakeeper.ha.policy.observe import Identity, member_record
from hakeeper.ha.snapshot import NodeSnapshot
from hakeeper.pg import bins
from hakeeper.pg.errors import PgError
from hakeeper.pg.probe import state_from_row
from hakeeper.pg.version import (
    PgVersion,
    binaries_version,
    major_refusal,
    parse_pg_version_file,
    parse_version_output,
    server_version_text,
    version_errors,
)
from tests.support.builders import SYSID, primary, replica, view

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("output", "major", "text"),
    [
        ("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", 15, "15.18"),
        ("postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)", 15, "15.6"),
        ("postgres (PostgreSQL) 17.10\n", 17, "17.10"),
        ("postgres (PostgreSQL) 18.6\n", 18, "18.6"),
        ("postgres (PostgreSQL) 18beta1\n", 18, "18beta1"),
        ("postgres (PostgreSQL) 19devel\n", 19, "19devel"),
        ("postgres (PostgreSQL) 16.4 (Ubuntu 16.4-1.pgdg22.04+1)", 16, "16.4"),
        ("postgres (PostgreSQL) 9.6.24\n", 9, "9.6"),
    ],
)
def test_postgres_version_output(output: str, major: int, text: str) -> None:
    assert parse_version_output(output) == PgVersion(major, text)


@pytest.mark.parametrize("output", ["", "psql 17.10", "postgres (PostgreSQL)", "command not found"])
def test_not_a_version_output(output: str) -> None:
    with pytest.raises(PgError, match="cannot read a PostgreSQL version"):
        parse_version_output(output)


@pytest.mark.parametrize(("text", "major"), [("15\n", 15), ("17", 17), ("18\n", 18), ("9.6\n", 9)])
def test_pg_version_file(text: str, major: int) -> None:
    assert parse_pg_version_file(text) == major


@pytest.mark.parametrize("text", ["", "seventeen\n", "17 18\n", "-1"])
def test_bad_pg_version_file(text: str) -> None:
    with pytest.raises(PgError, match="PG_VERSION holds"):
        parse_pg_version_file(text)


@pytest.mark.parametrize(
    ("num", "text"),
    [(150018, "15.18"), (170010, "17.10"), (180006, "18.6"), (180000, "18.0"), (90624, "9.6")],
)
def test_server_version_num(num: int, text: str) -> None:
    assert server_version_text(num) == text


def test_supported_majors() -> None:
    for major in (15, 16, 17, 18):
        assert major_refusal(PgVersion(major, f"{major}.1")) is None
    old = major_refusal(PgVersion(14, "14.13"))
    assert old is not None and "PostgreSQL 14.13" in old and "needs PostgreSQL 15 or later" in old
    new = major_refusal(PgVersion(19, "19devel"))
    assert new is not None and "newer than this hakeeper knows" in new


# -- the binaries and the data directory ------------------------------------------------------------


def fake_bin_dir(root: Path, output: str, name: str = "bin") -> Path:
    """A directory with a ``postgres`` that prints ``output`` for --version and a ``pg_ctl``."""
    d = root / name
    d.mkdir(parents=True)
    script = d / "postgres"
    script.write_text(f"#!/bin/sh\necho '{output}'\n")
    script.chmod(0o755)
    (d / "pg_ctl").write_text("#!/bin/sh\n")
    (d / "pg_ctl").chmod(0o755)
    return d


def data_dir(root: Path, major: int | None) -> Path:
    d = root / "data"
    d.mkdir()
    if major is not None:
        (d / "PG_VERSION").write_text(f"{major}\n")
    return d


def pg_cfg(data: Path, bin_dir: Path | None = None) -> PostgresConfig:
    return PostgresConfig.model_validate(
        {
            "data_dir": str(data),
            "bin_dir": None if bin_dir is None else str(bin_dir),
            "superuser": {"password": "su-secret"},
            "replication": {"password": "repl-secret"},
        }
    )


def test_binaries_version_runs_postgres_once_per_directory(tmp_path: Path) -> None:
    b = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 17.10")
    assert binaries_version(b) == PgVersion(17, "17.10")
    (b / "postgres").unlink()  # cached: not run again
    assert binaries_version(b) == PgVersion(17, "17.10")


def test_a_data_dir_of_another_major_is_refused_with_the_fix(tmp_path: Path) -> None:
    b = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)")
    d = data_dir(tmp_path, 17)
    assert version_errors(pg_cfg(d, b), b) == [
        (
            "postgresql.bin_dir",
            f"{b} is PostgreSQL 15, but postgresql.data_dir {d} holds a PostgreSQL 17 cluster "
            "(PG_VERSION); point bin_dir at PostgreSQL 17 binaries or run a major upgrade",
        )
    ]


@pytest.mark.parametrize("major", [18, None])
def test_the_same_major_or_an_empty_data_dir_is_fine(tmp_path: Path, major: int | None) -> None:
    b = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 18.6")
    assert version_errors(pg_cfg(data_dir(tmp_path, major), b), b) == []


def test_binaries_older_than_15_are_refused(tmp_path: Path) -> None:
    b = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 14.13")
    ((field, message),) = version_errors(pg_cfg(data_dir(tmp_path, None), b), b)
    assert field == "postgresql.bin_dir"
    assert message.startswith(f"{b} is PostgreSQL 14.13; hakeeper needs PostgreSQL 15 or later")


def test_binaries_that_do_not_run_and_a_garbled_pg_version_are_named(tmp_path: Path) -> None:
    b = tmp_path / "empty"
    b.mkdir()
    ((field, message),) = version_errors(pg_cfg(data_dir(tmp_path, None), b), b)
    assert field == "postgresql.bin_dir" and f"cannot run {b}/postgres --version" in message
    good = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 17.10", "good")
    d = tmp_path / "data"
    (d / "PG_VERSION").write_text("banana\n")
    ((field, message),) = version_errors(pg_cfg(d, good), good)
    assert field == "postgresql.data_dir" and "PG_VERSION holds 'banana'" in message


def test_find_bin_dir_prefers_the_data_dirs_major(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "usr-lib-postgresql"
    b15 = fake_bin_dir(root / "15", "postgres (PostgreSQL) 15.18")
    b17 = fake_bin_dir(root / "17", "postgres (PostgreSQL) 17.10")
    monkeypatch.setattr(bins, "_DEBIAN_ROOT", root)
    monkeypatch.setattr(bins, "DEFAULT_BIN_DIR", b15)
    d17 = data_dir(tmp_path, 17)
    assert bins.find_bin_dir(None, d17) == b17
    assert bins.find_bin_dir(None, tmp_path / "absent") == b15  # not initialized: the old rule
    assert bins.find_bin_dir(None) == b15
    assert bins.find_bin_dir(b15, d17) == b15  # a configured bin_dir wins (the start check judges it)
    (d17 / "PG_VERSION").write_text("16\n")  # no 16 installed: the old rule
    assert bins.find_bin_dir(None, d17) == b15


def test_bin_dirs_pick_by_the_data_dirs_major_and_name_upgrade_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "usr-lib-postgresql"
    monkeypatch.setattr(bins, "_DEBIAN_ROOT", root)
    b17 = fake_bin_dir(tmp_path / "opt17", "postgres (PostgreSQL) 17.10")
    b18 = fake_bin_dir(tmp_path / "opt18", "postgres (PostgreSQL) 18.6")
    d18 = data_dir(tmp_path, 18)
    # after an upgrade the node file still names 17 in bin_dir: the data directory's major decides
    assert bins.find_bin_dir(b17, d18, {17: b17, 18: b18}) == b18
    assert bins.find_bin_dir(b17, d18, {17: b17}) == b17  # not listed: bin_dir (the start check judges it)
    with pytest.raises(PgError, match=r"postgresql.bin_dirs.18 .* does not contain pg_ctl"):
        bins.find_bin_dir(b17, d18, {18: tmp_path / "nothing"})
    assert bins.bin_dir_for_major(18, b17, {18: b18})[0] == b18
    assert bins.bin_dir_for_major(17, b17, {18: b18})[0] == b17  # bin_dir is of that major
    found, looked = bins.bin_dir_for_major(18, b17, {})
    assert found is None and str(b17) in looked and str(root / "18" / "bin") in looked
    debian18 = fake_bin_dir(root / "18", "postgres (PostgreSQL) 18.6")
    assert bins.bin_dir_for_major(18, b17, {})[0] == debian18
    assert bins.bin_dir_for_major(18, b17, {18: b17})[0] == debian18  # a wrong entry is skipped


def _node_file(tmp_path: Path, data: Path, bin_dir: Path) -> Path:
    p = tmp_path / "node.yml"
    p.write_text(
        f"""\
scope: s
name: n1
postgresql:
  data_dir: {data}
  bin_dir: {bin_dir}
  superuser: {{password: su-secret}}
  replication: {{password: repl-secret}}
etcd: {{hosts: ["http://127.0.0.1:1"]}}
"""
    )
    return p


def test_the_agent_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    """The real CLI in a subprocess: the exit code and the absence of a traceback are what a
    user sees; etcd is never contacted (the port is closed) and no PostgreSQL starts."""
    b = fake_bin_dir(tmp_path, "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)")
    d = data_dir(tmp_path, 18)
    cfg = _node_file(tmp_path, d, b)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-m", "hakeeper", "agent", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert (
        f"{cfg}: postgresql.bin_dir: {b} is PostgreSQL 15, but postgresql.data_dir {d} holds a "
        "PostgreSQL 18 cluster (PG_VERSION); point bin_dir at PostgreSQL 18 binaries or run a major "
        "upgrade" in res.stderr
    )
    assert "agent_start_refused" in res.stderr  # and in the agent's log
    assert sorted(p.name for p in d.iterdir()) == ["PG_VERSION"]  # nothing written there


# -- the member's server version -----------------------------------------------------------------


def test_member_record_server_version_round_trip_and_old_records() -> None:
    m = replace_version(replica("b"), "17.10")
    assert Member.parse("b", m.to_json()).server_version == "17.10"
    old = json.loads(m.to_json())
    del old["server_version"]  # a record of an agent older than the field
    assert Member.parse("b", json.dumps(old).encode()).server_version is None


@pytest.mark.parametrize("bad", ["17.10 (Debian 17.10-1)", "17", "", 170010, "x" * 70, "17.10\n"])
def test_member_record_server_version_is_validated(bad: object) -> None:
    doc = json.loads(replica("b").to_json())
    doc["server_version"] = bad
    with pytest.raises(InvalidRecord):
        Member.parse("b", json.dumps(doc).encode())


def replace_version(m: Member, v: str | None) -> Member:
    return replace(m, server_version=v)


def render(v: ClusterView) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(members_table(v, "prod", now=2000.0))
    return console.export_text()


def _header(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if "Member" in ln)
    return [c.strip() for c in line.split("┃")][1:-1]


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in ln.split("│")][1:-1] for ln in text.splitlines() if ln.startswith("│")]


def test_list_shows_one_release_in_the_title_and_a_column_when_they_differ() -> None:
    same = view(
        replace_version(primary("a"), "17.10"),
        replace_version(replica("b"), "17.10"),
        replace_version(replica("c"), None),  # not running: no version, no disagreement
        leader="a",
    )
    text = render(same)
    assert f"cluster prod (system {SYSID}, PostgreSQL 17.10)" in text
    assert _header(text)[:5] == ["Member", "Host", "Role", "State", "TL"]  # no column
    assert [r["server_version"] for r in list_document(same)["members"]] == ["17.10", "17.10", None]

    mixed = view(replace_version(primary("a"), "17.10"), replace_version(replica("b"), "17.9"), leader="a")
    text = render(mixed)
    assert f"cluster prod (system {SYSID})" in text
    assert _header(text)[:5] == ["Member", "Host", "Role", "State", "PostgreSQL"]
    rows = {r[0]: r for r in _rows(text)}
    assert rows["a"][4] == "17.10" and rows["b"][4] == "17.9"

    unknown = view(primary("a"), replica("b"), leader="a")  # older agents: nothing to show
    assert f"cluster prod (system {SYSID})" in render(unknown)


def test_probe_carries_the_version_libpq_reported(tmp_path: Path) -> None:
    dd = str(tmp_path / "data")
    row: tuple[Any, ...] = (
        False,
        "0/1",
        "000000010000000000000001",
        None,
        None,
        1,
        0,
        None,
        None,
        [],
        dd,
        [],
    )
    st = state_from_row(row, data_dir=tmp_path / "data", port=5432, server_version_num=180006)
    assert st.server_version == "18.6"
    row = (True, None, None, "0/1", "0/1", 1, 0, None, None, [], dd, [])
    st = state_from_row(row, data_dir=tmp_path / "data", port=5432, server_version_num=150018)
    assert st.server_version == "15.18"
    assert state_from_row(row, data_dir=tmp_path / "data", port=5432).server_version is None


def test_version_gauge() -> None:
    assert _version_num("17.10") == 170010
    assert _version_num("18.6") == 180006
    assert _version_num(None) == 0


ME = Identity("a", "127.0.0.1", 5432, "http://127.0.0.1:8008", False, 1, False, False, 1, "1.0")


def _snapshot(version: str | None, *, running: bool = True) -> NodeSnapshot:
    probe = (
        LocalState(True, False, 1, 100, None, None, None, (), server_version=version)
        if running
        else LocalState.down("postmaster is not running")
    )
    me = member_record(ME, probe=probe, activity=None, initialized=True, view=view(leader="a"), now_wall=1e3)
    return NodeSnapshot(
        name="a",
        scope="c",
        tags={},
        probe=probe,
        view=ClusterView(members={"a": me}),
        member=me,
        activity=None,
        decision=None,
        loop_heartbeat=0.0,
        lease_remaining=1.0,
        writable=False,
        backup=None,
    )


def test_status_cluster_and_metric_carry_the_running_server_s_version() -> None:
    snap = _snapshot("18.6")
    assert snap.member.server_version == "18.6"
    assert node_status(snap)["server_version"] == "18.6"
    (doc,) = cluster_status(snap)["members"]
    assert doc["server_version"] == "18.6"
    metrics = HaMetrics()
    assert b"hakeeper_postgres_version_num 180006.0" in metrics.render(snap)
    # stopped: no version claimed (the binaries may have been upgraded meanwhile)
    down = _snapshot("18.6", running=False)
    assert down.member.server_version is None and node_status(down)["server_version"] is None
    assert b"hakeeper_postgres_version_num 0.0" in metrics.render(down)


# -- the demo's major ---------------------------------------------------------------------------------


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_demo_refuses_a_directory_of_another_major_before_touching_it(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    (demo_dir / "node1" / "data").mkdir(parents=True)
    (demo_dir / "node1" / "data" / "PG_VERSION").write_text("15\n")
    before = sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*"))
    res = _demo("--dir", str(demo_dir), "--pg-version", "18", "--base-port", "1")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    text = " ".join(res.stderr.split())  # rich may wrap
    assert (
        f"{demo_dir} holds a PostgreSQL 15 demo cluster; run it with --pg-version 15, or add --fresh "
        "to wipe it and start over on PostgreSQL 18" in text
    )
    assert sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*")) == before


def test_demo_refuses_a_major_it_has_no_build_of(tmp_path: Path) -> None:
    res = _demo("--dir", str(tmp_path / "d"), "--pg-version", "16")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--pg-version 16: the demo runs PostgreSQL 15, 17, 18" in " ".join(res.stderr.split())
    assert not (tmp_path / "d").exists()


def test_demo_major_of_an_existing_directory(tmp_path: Path) -> None:
    assert _existing_major(tmp_path, {}) is None
    assert _existing_major(tmp_path, {"pg_version": 17}) == 17  # data dirs not created yet
    assert _existing_major(tmp_path, {"pg_version": True}) is None
    (tmp_path / "node2" / "data").mkdir(parents=True)
    (tmp_path / "node2" / "data" / "PG_VERSION").write_text("18\n")
    assert _existing_major(tmp_path, {"pg_version": 17}) == 18  # the data directory is the truth
    assert _choose_major(tmp_path, None, 18) == 18  # a restart without the flag keeps the major
    assert _choose_major(tmp_path, None, None) == 15
    assert _choose_major(tmp_path, 17, None) == 17
