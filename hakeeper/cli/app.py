"""The `hakeeper` command line: the typer application, the consoles, and the commands every
build has (``config validate``, ``agent``).  The other commands live in modules that register
themselves on :data:`app` (:mod:`hakeeper.cli.main` imports only the one a call needs).

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
    # -h as well as --help, on every command (click hands it down to the subcommands)
    context_settings={"help_option_names": ["-h", "--help"]},
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
        return load_checked(path)
    except ConfigError as e:
        for field, msg in e.errors:
            err.print(f"{e.source}: {field}: {msg}", markup=False)
        raise typer.Exit(2) from None


def load_checked(path: Path) -> NodeConfig:
    """The node file with every check the agent starts with (raises :class:`ConfigError`): also
    what a running agent re-reads on `hakeeper reload` and SIGHUP."""
    cfg = load_node_config(path)
    # encryption keys are part of the configuration; core cannot read them (it is below
    # the backup layer that knows the key formats), so they are checked here -- importing
    # the backup layer (and the cipher library) only when a repository is encrypted
    if any(r.encryption is not None for r in cfg.backup.repositories):
        from hakeeper.backup.repos import key_errors

        bad_keys = key_errors(cfg.backup.repositories)
        if bad_keys:
            raise ConfigError(str(path), bad_keys)
    # Likewise PostgreSQL's TLS files: core does no I/O, so they are checked here, before
    # the agent starts a PostgreSQL that would fail on them (or serve a key others can read).
    if cfg.postgresql.tls is not None:
        from hakeeper.pg.files import tls_file_errors

        bad_tls = tls_file_errors(cfg.postgresql.tls)
        if bad_tls:
            raise ConfigError(str(path), bad_tls)
    return cfg


def check_versions_or_exit(path: Path, cfg: NodeConfig) -> None:
    """Before the agent starts anything: binaries of a supported major, and of the major the
    data directory holds (PostgreSQL would refuse the files, and the agent would retry the
    start forever).  A mismatch is a configuration error: exit 2 naming the file and field."""
    from hakeeper.pg.bins import node_bin_dir
    from hakeeper.pg.errors import PgError
    from hakeeper.pg.version import version_errors
    from hakeeper.util.log import get_logger, setup_logging

    try:
        errors = version_errors(cfg.postgresql, node_bin_dir(cfg.postgresql))
    except PgError as e:
        errors = [("postgresql.bin_dir", str(e))]
    if not errors:
        return
    # in the agent's log too (where its operator looks when the service does not come up)
    setup_logging(cfg.log.format, cfg.log.level)
    for field, msg in errors:
        get_logger("hakeeper.node").error("agent_start_refused", file=str(path), field=field, reason=msg)
        err.print(f"{path}: {field}: {msg}", markup=False)
    raise typer.Exit(2)


def _print_version(value: bool) -> None:
    if value:
        from hakeeper import __version__

        out.print(f"hakeeper {__version__} (Python {sys.version.split()[0]})", markup=False)
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print hakeeper's version and exit (`hakeeper version` says more).",
        ),
    ] = False,
) -> None:
    """PostgreSQL high availability and recovery manager."""


@config_app.command("validate")
def config_validate(config: ConfigOpt) -> None:
    """Check a node config file; print every error with file and field (exit 2 on error)."""
    cfg = load_or_exit(config)
    out.print(f"{config}: OK (scope={cfg.scope}, name={cfg.name})", markup=False)


@app.command()
def agent(config: ConfigOpt) -> None:
    """Run the HA agent beside this node's PostgreSQL (foreground)."""
    cfg = load_or_exit(config)
    check_versions_or_exit(config, cfg)
    import faulthandler
    import signal

    from hakeeper.node import run_agent

    # `kill -USR1 <agent pid>` writes every thread's stack to the agent's stderr: how a stuck
    # agent is diagnosed without stopping it (the chaos runner does it for runs that hang).
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    try:
        # reload and SIGHUP re-read the file with the same checks as here
        code = asyncio.run(run_agent(cfg, reread=lambda: load_checked(config)))
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)
