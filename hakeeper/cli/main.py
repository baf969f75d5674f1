"""The `hakeeper` command line.

User mistakes (bad config, unreachable etcd, unknown member) end with a one-line message and a
non-zero exit code, never a traceback.  Exit codes: 0 ok, 1 operation failed, 2 bad usage/config.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hakeeper.core.config import ConfigError, NodeConfig, load_node_config

app = typer.Typer(
    name="hakeeper",
    help="PostgreSQL high availability and recovery manager.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Node configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped or captured output gets no terminal width; rich would squeeze tables to 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="Node YAML file.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


def load_or_exit(path: Path) -> NodeConfig:
    try:
        return load_node_config(path)
    except ConfigError as e:
        for field, msg in e.errors:
            err.print(f"{e.source}: {field}: {msg}", markup=False)
        raise typer.Exit(2) from None


@config_app.command("validate")
def config_validate(config: ConfigOpt) -> None:
    """Check a node config file; print every error with file and field (exit 2 on error)."""
    cfg = load_or_exit(config)
    out.print(f"{config}: OK (scope={cfg.scope}, name={cfg.name})", markup=False)


@app.command()
def agent(config: ConfigOpt) -> None:
    """Run the HA agent beside this node's PostgreSQL (foreground)."""
    cfg = load_or_exit(config)
    import faulthandler
    import signal

    from hakeeper.node import run_agent

    # `kill -USR1 <agent pid>` writes every thread's stack to the agent's stderr: how a stuck
    # agent is diagnosed without stopping it (the chaos runner does it for runs that hang).
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    try:
        code = asyncio.run(run_agent(cfg))
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


# The module that registers each command (imported alone when the command is known: a CLI call
# then does not pay for importing every other command's dependencies, ~0.1 s).
_COMMAND_MODULES = {
    "backup": "backup_cmds",
    "restore": "backup_cmds",
    "dump": "dump_cmds",
    "schedule": "schedule_cmds",
    "verify": "verify_cmds",
    "report": "verify_cmds",
    "demo": "demo_cmd",
    "list": "cluster_cmds",
    "history": "cluster_cmds",
    **dict.fromkeys(
        (
            "switchover",
            "failover",
            "pause",
            "resume",
            "restart",
            "reinit",
            "reload",
            "show-config",
            "edit-config",
            "dsn",
        ),
        "ops_cmds",
    ),
    "agent": None,
    "config": None,
}
_ALL_MODULES = (
    "cluster_cmds",
    "ops_cmds",
    "demo_cmd",
    "backup_cmds",
    "schedule_cmds",
    "dump_cmds",
    "verify_cmds",
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
