"""Pure parts of the operations CLI: --set/--pg parsing, merge patches, diffs, times, conninfo."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hakeeper.cli import ops_cmds, restart_cmds
from hakeeper.cli.app import app
from hakeeper.cli.main import _register_optional_commands
from hakeeper.cli.ops_cmds import (
    ApiAnswer,
    ApiAuth,
    UsageError,
    config_diff,
    conninfo,
    make_merge_patch,
    parse_pg,
    parse_set,
    parse_when,
    resolve_auth,
    set_path,
)
from hakeeper.core.cluster import ClusterView, Leader, Member, MemberRole, MemberState
from hakeeper.core.config import NodeConfig
from hakeeper.ha.requests import merge_patch

_register_optional_commands()


@pytest.mark.parametrize(
    ("arg", "path", "value"),
    [
        ("loop_wait=2", ["loop_wait"], 2),
        ("ttl=10", ["ttl"], 10),
        ("pause=true", ["pause"], True),
        ("loop_wait=1.5", ["loop_wait"], 1.5),
        ("postgresql.parameters.work_mem=8MB", ["postgresql", "parameters", "work_mem"], "8MB"),
        ("a.b=null", ["a", "b"], None),
        ("a=~", ["a"], None),
        ("a=", ["a"], ""),
        ("a=x=y", ["a"], "x=y"),
        ("a=k: v", ["a"], "k: v"),
        ("a={k: 1}", ["a"], {"k": 1}),
        (" ttl =7", ["ttl"], 7),
    ],
)
def test_parse_set(arg: str, path: list[str], value: object) -> None:
    assert parse_set(arg) == (path, value)


@pytest.mark.parametrize("arg", ["loop_wait", "=2", "a..b=1", ".a=1", "a.=1", ""])
def test_parse_set_rejects(arg: str) -> None:
    with pytest.raises(UsageError):
        parse_set(arg)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("work_mem=8MB", "8MB"),
        ("max_connections=200", 200),
        ("random_page_cost=1.1", 1.1),
        ("wal_log_hints=on", "on"),  # not YAML's boolean
        ("work_mem=null", None),
        ("search_path='$user', public", "'$user', public"),
    ],
)
def test_parse_pg(arg: str, value: object) -> None:
    path, v = parse_pg(arg)
    assert path == ["postgresql", "parameters", arg.split("=")[0]]
    assert v == value


@pytest.mark.parametrize("arg", ["work_mem", "=1"])
def test_parse_pg_rejects(arg: str) -> None:
    with pytest.raises(UsageError):
        parse_pg(arg)


def test_set_path_creates_deletes_and_refuses_scalars() -> None:
    doc: dict[str, object] = {"ttl": 5, "postgresql": {"parameters": {"a": 1}}}
    set_path(doc, ["postgresql", "parameters", "b"], "x")
    set_path(doc, ["postgresql", "parameters", "a"], None)
    set_path(doc, ["new", "deep", "key"], 1)
    set_path(doc, ["missing", "key"], None)  # deleting what is not there is a no-op
    assert doc == {"ttl": 5, "postgresql": {"parameters": {"b": "x"}}, "new": {"deep": {"key": 1}}}
    with pytest.raises(UsageError):
        set_path(doc, ["ttl", "x"], 1)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"a": 1}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}),
        ({"p": {"x": 1, "y": 2}}, {"p": {"x": 1, "z": 3}}),
        ({"p": {"x": 1}}, {"p": 5}),
        ({}, {"q": {"r": [1, 2]}}),
        ({"a": [1, 2]}, {"a": [2]}),
        ({"a": 1}, {"a": 1}),
    ],
)
def test_make_merge_patch_round_trips(old: dict[str, object], new: dict[str, object]) -> None:
    patch = make_merge_patch(old, new)
    assert merge_patch(old, patch) == new
    if old == new:
        assert patch == {}


def test_make_merge_patch_is_minimal() -> None:
    old = {"ttl": 5, "loop_wait": 1.0, "postgresql": {"parameters": {"a": 1, "b": 2}}}
    new = {"ttl": 5, "loop_wait": 2, "postgresql": {"parameters": {"a": 1}}}
    assert make_merge_patch(old, new) == {"loop_wait": 2, "postgresql": {"parameters": {"b": None}}}


def test_config_diff() -> None:
    assert config_diff({"a": 1}, {"a": 1}) == ""
    d = config_diff({"a": 1, "b": 2}, {"a": 1, "b": 3})
    assert d.startswith("--- current\n+++ new\n")
    assert "-b: 2\n" in d and "+b: 3\n" in d and " a: 1\n" in d


def test_parse_when() -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_when(None, now) is None
    assert parse_when("now", now) is None
    when = parse_when("2030-01-01T13:00:00Z", now)
    assert when == dt.datetime(2030, 1, 1, 13, 0, tzinfo=dt.UTC)
    when = parse_when("2030-01-01T14:00+01:00", now)
    assert when is not None and when.utcoffset() == dt.timedelta(hours=1)
    naive = parse_when("2030-01-02T00:00:00", now)
    assert naive is not None and naive.tzinfo is not None  # local time
    with pytest.raises(UsageError, match="past"):
        parse_when("2029-12-31T00:00Z", now)
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_when("tomorrow", now)


def test_conninfo_quotes() -> None:
    assert conninfo({"host": "h", "port": "5432"}) == "host=h port=5432"
    assert conninfo({"password": "a b'c\\"}) == r"password='a b\'c\\'"
    assert conninfo({"x": ""}) == "x=''"


def _node_cfg(api: dict[str, object]) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "scope": "s",
            "name": "n",
            "api": api,
            "postgresql": {
                "data_dir": "/tmp/x",
                "superuser": {"password": "su"},
                "replication": {"password": "repl"},
            },
        }
    )


def test_resolve_auth_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAKEEPER_API_TOKEN", raising=False)
    cfg = _node_cfg({"token": "from-file", "username": "u", "password": "p"})
    assert resolve_auth(cfg, None, None, None) == ApiAuth(token="from-file")
    assert resolve_auth(cfg, "cli", None, None) == ApiAuth(token="cli")
    assert resolve_auth(cfg, None, "x", "y") == ApiAuth(username="x", password="y")
    monkeypatch.setenv("HAKEEPER_API_TOKEN", "env")
    assert resolve_auth(cfg, None, None, None) == ApiAuth(token="env")
    monkeypatch.delenv("HAKEEPER_API_TOKEN")
    basic = resolve_auth(_node_cfg({"username": "u", "password": "p"}), None, None, None)
    assert basic.headers() == {"Authorization": "Basic dTpw"}
    assert resolve_auth(None, None, None, None).headers() == {}
    assert ApiAuth(token="t").headers() == {"Authorization": "Bearer t"}


# ---- usage errors end with exit 2 and one line, before anything is contacted

runner = CliRunner()


def _cfg_file(tmp_path: Path) -> Path:
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
            }
        )
    )
    return p


@pytest.mark.parametrize(
    "args",
    [
        ["list", "-o", "xml"],
        ["list", "--watch", "soon"],
        ["switchover", "--scheduled", "yesterday-ish"],
        ["edit-config", "--set", "nokey"],
        ["edit-config", "--pg", "=1"],
        ["dsn", "--role", "leader"],
        ["show-config", "-o", "xml"],  # "table" works since issue 13 (item 15)
        ["pause"],  # neither -c nor --etcd/--scope
    ],
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    extra = [] if args == ["pause"] else ["-c", str(_cfg_file(tmp_path))]
    res = runner.invoke(app, args + extra)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_unreachable_etcd_is_one_line_exit_1(tmp_path: Path) -> None:
    res = runner.invoke(app, ["switchover", "--force", "-c", str(_cfg_file(tmp_path))])
    assert res.exit_code == 1
    assert "cannot read the cluster from etcd" in res.output
    assert "Traceback" not in res.output


def test_unreachable_etcd_keeps_stdout_clean(tmp_path: Path) -> None:
    res = runner.invoke(app, ["list", "-o", "json", "-c", str(_cfg_file(tmp_path))])
    assert res.exit_code == 1
    assert res.stdout == ""  # library warnings never land in a script's JSON


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["list", "--watch"], ["list", "--watch", "2"]),
        (["list", "-w", "-o", "json"], ["list", "-w", "2", "-o", "json"]),
        (["list", "--watch", "0.5"], ["list", "--watch", "0.5"]),
        (["-c", "x", "list", "--watch", "-c", "y"], ["-c", "x", "list", "--watch", "2", "-c", "y"]),
        (["history", "--watch"], ["history", "--watch"]),  # only list has --watch
        (["list", "--watch=3"], ["list", "--watch=3"]),
    ],
)
def test_expand_watch_default(argv: list[str], expected: list[str]) -> None:
    from hakeeper.cli.cluster_cmds import expand_watch_default

    assert expand_watch_default(argv) == expected


def test_confirm(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from hakeeper.cli import ops_cmds

    ops_cmds.confirm("anything?", force=True)  # --force: never asks
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    with pytest.raises(typer.Exit) as e:
        ops_cmds.confirm("anything?", force=False)
    assert e.value.exit_code == 1
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    answers = iter([True, False])
    monkeypatch.setattr(typer, "confirm", lambda *_a, **_k: next(answers))
    ops_cmds.confirm("go?", force=False)  # yes
    with pytest.raises(typer.Exit) as e:
        ops_cmds.confirm("go?", force=False)  # no
    assert e.value.exit_code == 1


def test_every_command_is_found_in_its_module() -> None:
    """main() imports only the module of the command given; each top-level command and group
    must be mapped to the module that registers it (else `hakeeper CMD` says no such command)."""
    from hakeeper.cli.main import _COMMAND_MODULES

    seen = set()
    for cmd in app.registered_commands:
        assert cmd.callback is not None
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        module = cmd.callback.__module__.removeprefix("hakeeper.cli.")
        assert name in _COMMAND_MODULES, name
        assert _COMMAND_MODULES[name] == (None if module == "app" else module), name
        seen.add(name)
    for group in app.registered_groups:
        assert group.name in _COMMAND_MODULES, group.name
        sub = group.typer_instance
        assert sub is not None
        modules = {c.callback.__module__ for c in sub.registered_commands if c.callback is not None}
        expected = _COMMAND_MODULES[group.name]
        assert modules == {f"hakeeper.cli.{expected}" if expected else "hakeeper.cli.app"}, group.name
        seen.add(group.name)
    assert "backup" in seen and "restore" in seen and "list" in seen


def test_the_entry_point_leaves_the_garbage_collector_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The console script imports with the collector off (start-up speed); whatever the command
    does, including a usage error, the collector is on again while the command runs."""
    import gc

    from hakeeper.cli import entry

    seen: list[bool] = []
    monkeypatch.setattr(sys, "argv", ["hakeeper", "config", "validate", "-c", str(tmp_path / "none.yml")])

    def load_and_fail(path: object) -> float:
        seen.append(gc.isenabled())
        return 1 / 0

    monkeypatch.setattr("hakeeper.cli.app.load_node_config", load_and_fail)
    try:
        with pytest.raises(ZeroDivisionError):
            entry.main()
    finally:
        gc.unfreeze()
    assert seen == [True] and gc.isenabled()


# -- per-member bodies, failover flags and reinit --wait, against a fake API --------------------

API_N2 = "http://127.0.0.2:8008"


class FakeApi:
    """Records what the CLI sends; answers from ``answers`` (path -> list of (status, body))."""

    def __init__(self, answers: dict[str, list[tuple[int, Any]]]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str, Any]] = []

    async def __call__(self, method: str, url: str, auth: Any, body: Any, *rest: Any) -> ApiAnswer:
        path = url.removeprefix(API_N2)
        self.sent.append((method, path, body))
        queue = self.answers[path]
        status, data = queue.pop(0) if len(queue) > 1 else queue[0]
        return ApiAnswer(status, data, url)


def _two_members(monkeypatch: pytest.MonkeyPatch, api: FakeApi) -> None:
    n1 = Member("n1", MemberRole.PRIMARY, MemberState.RUNNING, api_url="http://127.0.0.1:8008")
    n2 = Member("n2", MemberRole.REPLICA, MemberState.STREAMING, api_url=API_N2)
    view = ClusterView(members={"n1": n1, "n2": n2}, leader=Leader("n1", 1, 1, 1))
    for module in (ops_cmds, restart_cmds):  # restart lives in restart_cmds
        monkeypatch.setattr(module, "read_view", lambda ctx: view)
    monkeypatch.setattr(ops_cmds, "_http", api)  # every command's requests go through ops_cmds
    monkeypatch.setattr(ops_cmds, "REINIT_POLL_S", 0.0)


def _run(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "-c", str(_cfg_file(tmp_path)), "--api-url", API_N2])


def test_failover_force_only_skips_the_prompt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api = FakeApi({"/failover": [(200, {"message": "failed over to n2", "leader": "n2"})]})
    _two_members(monkeypatch, api)
    # Leader first, then the candidate: only n2's address is trusted here.
    res = _run(tmp_path, "failover", "--candidate", "n2", "--force")
    assert res.exit_code == 0, res.output
    assert api.sent == [("POST", "/failover", {"candidate": "n2", "allow_data_loss": False})]
    # --allow-data-loss does not skip the prompt (no terminal: refused, nothing sent) ...
    res = _run(tmp_path, "failover", "--candidate", "n2", "--allow-data-loss")
    assert res.exit_code == 1 and "not confirmed" in res.output and len(api.sent) == 1
    # ... and is sent only when given.
    res = _run(tmp_path, "failover", "--candidate", "n2", "--allow-data-loss", "--force")
    assert res.exit_code == 0, res.output
    assert api.sent[-1] == ("POST", "/failover", {"candidate": "n2", "allow_data_loss": True})


def test_per_member_commands_name_their_member(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api = FakeApi(
        {
            "/restart": [(200, {"message": "postgres restarted"})],
            "/reload": [(200, {"message": "configuration reloaded"})],
            "/reinitialize": [(202, {"id": "j1", "member": "n2", "state": "running", "message": "started"})],
        }
    )
    _two_members(monkeypatch, api)
    for args in (["restart", "n2", "--force"], ["reload", "n2"], ["reinit", "n2", "--force"]):
        res = _run(tmp_path, *args)
        assert res.exit_code == 0, res.output
    assert api.sent == [
        ("POST", "/restart", {"member": "n2"}),
        ("POST", "/reload", {"member": "n2"}),
        ("POST", "/reinitialize", {"member": "n2"}),
    ]
    assert "hakeeper reinit n2 --status --wait" in res.output  # how to follow it


def _job(state: str, phase: str, **kw: Any) -> dict[str, Any]:
    return {"id": "j1", "member": "n2", "source": "n1", "state": state, "phase": phase, **kw}


def test_reinit_wait_follows_the_job_to_its_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api = FakeApi(
        {
            "/reinitialize": [(202, _job("running", "stopping"))],
            "/reinitialize/j1": [
                (200, _job("running", "cloning", bytes_copied=3 << 20)),
                (200, _job("running", "streaming")),
                (200, _job("succeeded", "streaming", bytes_copied=5 << 20)),
            ],
        }
    )
    _two_members(monkeypatch, api)
    res = _run(tmp_path, "reinit", "n2", "--force", "--wait")
    assert res.exit_code == 0, res.output
    assert "j1 of n2 from n1: cloning, 3.0 MB copied" in res.output
    assert "j1 of n2: succeeded, streaming from n1, 5.0 MB copied" in res.output
    assert [p for _, p, _ in api.sent] == ["/reinitialize"] + ["/reinitialize/j1"] * 3


def test_reinit_wait_exits_1_with_the_error_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = FakeApi(
        {
            "/reinitialize": [(202, _job("running", "stopping"))],
            "/reinitialize/j1": [(200, _job("failed", "cloning", error="pg_basebackup failed (exit 1)"))],
        }
    )
    _two_members(monkeypatch, api)
    res = _run(tmp_path, "reinit", "n2", "--force", "--wait")
    assert res.exit_code == 1
    assert "failed during cloning: pg_basebackup failed (exit 1)" in res.output


def test_reinit_wait_on_ctrl_c_stops_watching_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = FakeApi(
        {
            "/reinitialize": [(200, _job("running", "cloning"))],
            "/reinitialize/j1": [(200, _job("running", "cloning"))],
        }
    )
    _two_members(monkeypatch, api)

    def interrupted(_s: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupted)
    res = _run(tmp_path, "reinit", "n2", "--status", "--wait")
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert "stopped watching; the reinit goes on on n2" in res.output
    # --status starts nothing; --wait then follows the job it found
    assert api.sent == [("GET", "/reinitialize", None), ("GET", "/reinitialize/j1", None)]
