"""The `hakeeper` console script: imports the module of the command given (every module for
help or an unknown command) and runs the application of :mod:`hakeeper.cli.app`."""

from __future__ import annotations

import sys

from hakeeper.cli.app import app

# The module that registers each command (imported alone when the command is known: a CLI call
# then does not pay for importing every other command's dependencies, ~0.1 s).
_COMMAND_MODULES = {
    "backup": "backup_cmds",
    "restore": "backup_cmds",
    "dump": "dump_cmds",
    "schedule": "schedule_cmds",
    "verify": "verify_cmds",
    "report": "verify_cmds",
    **dict.fromkeys(("repo", "check", "info"), "repo_cmds"),
    "demo": "demo_cmd",
    "list": "cluster_cmds",
    "history": "cluster_cmds",
    **dict.fromkeys(
        (
            "switchover",
            "failover",
            "pause",
            "resume",
            "reinit",
            "reload",
            "show-config",
            "edit-config",
            "dsn",
        ),
        "ops_cmds",
    ),
    **dict.fromkeys(("remove", "query", "version"), "admin_cmds"),
    **dict.fromkeys(("restart", "flush"), "restart_cmds"),
    "upgrade": "upgrade_cmds",
    "agent": None,
    "config": None,
}
_ALL_MODULES = (
    "cluster_cmds",
    "ops_cmds",
    "restart_cmds",
    "demo_cmd",
    "backup_cmds",
    "schedule_cmds",
    "dump_cmds",
    "verify_cmds",
    "admin_cmds",
    "repo_cmds",
    "upgrade_cmds",
)


def _register_optional_commands(args: list[str] | None = None) -> None:
    """Import the modules whose commands register themselves on ``app``: the one of the command
    in ``args`` (``sys.argv[1:]``) if known, else all (help, an unknown command)."""
    import importlib

    first = args[0] if args else None
    names = (_COMMAND_MODULES[first],) if first in _COMMAND_MODULES else _ALL_MODULES
    for name in names:
        if name is None:
            continue
        try:
            importlib.import_module(f"hakeeper.cli.{name}")
        except ModuleNotFoundError as e:  # pragma: no cover - a module not in this build
            if e.name != f"hakeeper.cli.{name}":
                raise


def prepare(args: list[str]) -> list[str]:
    """Import what the command in ``args`` needs; the arguments to run it with."""
    _register_optional_commands(args)
    if "list" in args:
        from hakeeper.cli.cluster_cmds import expand_watch_default

        args = expand_watch_default(args)
    return args


def run(args: list[str]) -> None:
    try:
        app(args=args)
    except KeyboardInterrupt:
        sys.exit(130)


def main() -> None:
    run(prepare(sys.argv[1:]))
