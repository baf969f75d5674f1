"""The pure parts of ``remove``, ``query``, ``version``, ``pause --wait`` and ``-h``: the
confirmation, the removal plan and refusal, argument splitting, member choice, result rendering,
pause acknowledgement, and the help/version options on every command."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from hakeeper import __version__
from hakeeper.cli.admin_cmds import (
    QueryTarget,
    ResultSet,
    UsageProblem,
    cell,
    cell_text,
    choose_member,
    confirmation_problem,
    pg_error_line,
    query_target,
    removal_plan,
    result_table,
    running_refusal,
    split_query_args,
)
from hakeeper.cli.app import app
from hakeeper.cli.main import _register_optional_commands
from hakeeper.cli.pause_wait import pause_laggards
from hakeeper.core.cluster import Member
from hakeeper.core.config import DynamicConfig, NodeConfig
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import KV
from hakeeper.ha.policy.observe import Identity, member_record
from tests.support.builders import primary, replica, view

_register_optional_commands()  # every command on ``app``, as `hakeeper --help` sees them
runner = CliRunner()

# ---------------------------------------------------------------------------- remove


@pytest.mark.parametrize(
    ("typed", "ok"),
    [
        ("prod", True),
        ("Prod", False),  # no case folding
        ("pro", False),  # no prefix
        ("prod ", False),  # no trimming
        (" prod", False),
        ("", False),
        ("   ", False),
        (None, False),
        ("prod2", False),
    ],
)
def test_only_the_exact_scope_confirms(typed: str | None, ok: bool) -> None:
    problem = confirmation_problem("prod", typed)
    assert (problem is None) is ok, problem


def _kv(key: str, value: str, rev: int = 5, lease: int = 0) -> KV:
    return KV(key, value.encode(), rev, rev, 1, lease)


def test_the_removal_plan_names_the_leader_the_live_members_and_the_system_identifier() -> None:
    k = Keys.of("/hakeeper", "prod")
    kvs = {
        kv.key: kv
        for kv in (
            _kv(k.initialize, "7301"),
            _kv(k.config, "{}"),
            _kv(k.leader, "db1", lease=9),
            _kv(k.member("db1"), "{}", lease=9),
            _kv(k.member("db2"), "{}", lease=8),
            _kv(k.history, "[]"),
        )
    }
    plan = removal_plan(k, kvs, 40)
    assert plan.running and plan.leader == "db1" and plan.live_members == ("db1", "db2")
    assert plan.system_identifier == "7301" and plan.revision == 40 and len(plan.keys) == 6
    assert plan.prefix == "/hakeeper/prod/"
    why = running_refusal(plan, "at once")
    assert "leader key (db1)" in why and "member keys of db1, db2" in why and "--while-running" in why
    stopped = removal_plan(
        k, {key: kv for key, kv in kvs.items() if "/members/" not in key and key != k.leader}, 41
    )
    assert not stopped.running and stopped.leader is None and stopped.live_members == ()
    members_only = removal_plan(k, {k.member("db3"): _kv(k.member("db3"), "{}")}, 42)
    assert members_only.running, "a member key alone means an agent runs"


def test_remove_without_a_terminal_or_confirmation_changes_nothing(tmp_path: Path) -> None:
    # etcd at port 9 cannot be reached: the command must fail on the read, before any prompt
    cfg = tmp_path / "node.yml"
    cfg.write_text(_node_yaml(tmp_path))
    res = runner.invoke(app, ["remove", "s", "-c", str(cfg)])
    assert res.exit_code == 1 and "cannot read the cluster from etcd" in res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------- query


def test_query_arguments_are_member_then_sql() -> None:
    assert split_query_args(["SELECT 1"], False) == (None, "SELECT 1")
    assert split_query_args(["db2", "SELECT 1"], False) == ("db2", "SELECT 1")
    assert split_query_args([], True) == (None, None)
    assert split_query_args(["db2"], True) == ("db2", None)
    for bad, from_file in (([], False), (["a", "b", "c"], False), (["a", "b"], True)):
        with pytest.raises(UsageProblem):
            split_query_args(bad, from_file)


def _cluster() -> tuple[Member, Member, Member]:
    p = replace(primary("db1"), host="10.0.0.1", port=5432)
    r2 = replica("db2", lag=100)
    r3 = replica("db3", lag=5)
    return p, r2, r3


def test_a_role_picks_the_leader_or_the_least_lagging_replica() -> None:
    p, r2, r3 = _cluster()
    v = view(p, r2, r3, leader="db1")
    assert choose_member(v, None, "primary").name == "db1"
    assert choose_member(v, None, None).name == "db1"
    assert choose_member(v, None, "any").name == "db1"
    assert choose_member(v, None, "replica").name == "db3"
    # a replica kept out of load balancing is chosen only when there is no other
    v2 = view(p, r2, replace(r3, noloadbalance=True), leader="db1")
    assert choose_member(v2, None, "replica").name == "db2"
    no_leader = view(r2, r3)
    assert choose_member(no_leader, None, "any").name == "db3"
    with pytest.raises(LookupError, match="no primary"):
        choose_member(no_leader, None, "primary")
    with pytest.raises(LookupError, match="no replica"):
        choose_member(view(p, leader="db1"), None, "replica")


def test_a_named_member_must_exist_and_have_the_role_asked_for() -> None:
    p, r2, r3 = _cluster()
    v = view(p, r2, r3, leader="db1")
    assert choose_member(v, "db2", None).name == "db2"
    assert choose_member(v, "db2", "replica").name == "db2"
    assert choose_member(v, "db1", "primary").name == "db1"
    with pytest.raises(LookupError, match="not the primary"):
        choose_member(v, "db2", "primary")
    with pytest.raises(LookupError, match="not a replica"):
        choose_member(v, "db1", "replica")
    with pytest.raises(LookupError, match=r"db9.*members: db1, db2, db3"):
        choose_member(v, "db9", None)


def test_values_render_for_json_and_for_a_table() -> None:
    row = (
        None,
        True,
        3,
        1.5,
        float("nan"),
        decimal.Decimal("1.10"),
        dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        uuid.UUID(int=1),
        b"\x00\xff",
        [1, None],
        {"a": dt.date(2030, 1, 2)},
    )
    rs = ResultSet(tuple(f"c{i}" for i in range(len(row))), (row,), "SELECT 1")
    doc = rs.to_dict()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc, "strict JSON, no NaN"
    assert doc["rows"][0] == [
        None,
        True,
        3,
        1.5,
        "nan",
        "1.10",
        "2030-01-02T03:04:05+00:00",
        "00000000-0000-0000-0000-000000000001",
        "\\x00ff",
        [1, None],
        {"a": "2030-01-02"},
    ]
    assert [cell_text(v) for v in row[:3]] == ["NULL", "t", "3"]
    assert cell_text([1, None]) == "[1, null]"
    assert cell(ValueError("odd")) == "odd"  # anything else: its text
    t = result_table(rs)
    assert [c.header for c in t.columns] == list(rs.columns) and t.row_count == 1


class _Diag:
    def __init__(self, primary: str | None, sqlstate: str | None = None, severity: str | None = None) -> None:
        self.message_primary, self.sqlstate, self.severity = primary, sqlstate, severity


class _Err(psycopg.Error):
    def __init__(self, text: str, diag: _Diag) -> None:
        super().__init__(text)
        self._d = diag

    @property
    def diag(self) -> _Diag:  # type: ignore[override]
        return self._d


def test_a_postgresql_error_is_one_line_without_the_password() -> None:
    e = _Err(
        'relation "nope" does not exist\nLINE 1: ...',
        _Diag('relation "nope" does not exist', "42P01", "ERROR"),
    )
    assert pg_error_line(e, "s3cret") == 'ERROR 42P01: relation "nope" does not exist'
    conn = _Err("connection failed: password s3cret\n  refused", _Diag(None))
    line = pg_error_line(conn, "s3cret")
    assert "\n" not in line and "s3cret" not in line and "********" in line


def _node_yaml(tmp_path: Path, tls: bool = False) -> str:
    doc: dict[str, object] = {
        "scope": "s",
        "name": "n",
        "etcd": {"hosts": ["http://127.0.0.1:9"]},
        "postgresql": {
            "data_dir": str(tmp_path / "d"),
            "superuser": {"username": "admin", "password": "su-pass"},
            "replication": {"password": "repl"},
        },
    }
    return json.dumps(doc)


def test_the_superuser_password_goes_only_to_the_superuser_and_never_into_the_conninfo(
    tmp_path: Path,
) -> None:
    cfg = NodeConfig.model_validate(json.loads(_node_yaml(tmp_path)))
    m = replace(replica("db2"), host="10.0.0.2", port=6543)
    t = query_target(cfg, m, "app", None)
    assert t.password == "su-pass" and "su-pass" not in t.conninfo
    assert "host=10.0.0.2" in t.conninfo and "port=6543" in t.conninfo
    assert "user=admin" in t.conninfo and "dbname=app" in t.conninfo
    other = query_target(cfg, m, "postgres", "reader")
    assert other == QueryTarget(other.conninfo, None) and "user=reader" in other.conninfo
    assert "require_auth" not in other.conninfo, "libpq's own settings for another user"
    anon = query_target(None, m, "postgres", None)
    assert anon.password is None and "user=postgres" in anon.conninfo


# ---------------------------------------------------------------------------- pause --wait


def test_pause_laggards_are_members_that_report_otherwise_or_nothing() -> None:
    p, r2, r3 = _cluster()
    v = view(replace(p, paused=True), replace(r2, paused=False), r3, leader="db1")
    assert pause_laggards(v, True).keys() == {"db2", "db3"}
    assert "older version" in pause_laggards(v, True)["db3"]
    assert "still reports not paused" in pause_laggards(v, True)["db2"]
    assert pause_laggards(v, False).keys() == {"db1", "db3"}
    all_paused = view(*(replace(m, paused=True) for m in (p, r2, r3)), leader="db1")
    assert pause_laggards(all_paused, True) == {}


def test_the_member_record_acknowledges_the_pause_it_decided_under() -> None:
    ident = Identity("db1", "127.0.0.1", 5432, "http://x", False, 1, False, False, 1, __version__)
    for pause in (True, False):
        v = view(primary("db1"), leader="db1", config=DynamicConfig(pause=pause))
        m = member_record(ident, probe=None, activity=None, initialized=True, view=v, now_wall=1.7e9)
        assert m.paused is pause
        assert Member.parse("db1", m.to_json()).paused is pause, "it survives the round trip"
    assert Member.parse("db1", b"{}").paused is None, "an older agent's record"


# ---------------------------------------------------------------------------- version, -h


def test_dash_version_prints_the_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and f"hakeeper {__version__}" in res.output


def test_version_without_a_config_needs_nothing_running() -> None:
    res = runner.invoke(app, ["version", "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["hakeeper"] == __version__ and doc["python"].startswith("3.")
    assert "postgresql" not in doc and "agents" not in doc


def _all_command_paths() -> list[list[str]]:
    paths: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():  # a group (typer vendors click)
            walk(sub, [*path, name])

    walk(get_command(app), [])
    assert len(paths) > 30, paths  # every module's commands are registered
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "hakeeper")
def test_dash_h_is_help_on_every_command(path: list[str]) -> None:
    short = runner.invoke(app, [*path, "-h"])
    long = runner.invoke(app, [*path, "--help"])
    assert short.exit_code == 0, short.output
    assert short.output == long.output and "Usage:" in short.output
