"""Group help names every command of the group (issue 13, item 15: `backup --help` did not list
`copy` and `policy`); `show-config -o table` flattens the dynamic config one key per row."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

import hakeeper.cli.backup_cmds  # noqa: F401  (registers the `backup` group)
from hakeeper.cli.app import app
from hakeeper.cli.backup_cmds import backup_app
from hakeeper.cli.ops_cmds import _flatten

runner = CliRunner()


def _names(group: typer.Typer) -> list[str]:
    return [c.name or (c.callback.__name__ if c.callback else "") for c in group.registered_commands]


def test_backup_help_lists_every_backup_command() -> None:
    names = _names(backup_app)
    assert {"create", "list", "info", "expire", "copy", "policy"} <= set(names)
    res = runner.invoke(app, ["backup", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = res.output.split("Options")[0]
    for name in names:
        assert name in summary, (name, summary)


def test_show_config_table_rows_are_dotted_keys_with_the_yaml_values() -> None:
    doc = {
        "ttl": 5,
        "pause": False,
        "postgresql": {"parameters": {"work_mem": "8MB", "max_connections": 100}, "use_pg_rewind": True},
        "tags": {},
        "standby": None,
        "list": ["a", 1],
    }
    assert _flatten(doc) == [
        ("list", '["a", 1]'),
        ("pause", "false"),
        ("postgresql.parameters.max_connections", "100"),
        ("postgresql.parameters.work_mem", "8MB"),
        ("postgresql.use_pg_rewind", "true"),
        ("standby", "null"),
        ("tags", "{}"),
        ("ttl", "5"),
    ]
