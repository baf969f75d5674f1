"""Locating and running the PostgreSQL binaries (initdb, pg_ctl, pg_rewind, ...)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from hakeeper.pg.errors import PgError
from hakeeper.util.proc import Result, RunAs, run

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
# Keep C-locale output from pg_controldata & co. (we parse it).
C_LOCALE = {"LC_ALL": "C", "LC_MESSAGES": "C", "LANG": "C"}


def _has_pg_ctl(d: Path) -> bool:
    return (d / "pg_ctl").is_file()


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", p.name)) or (0,)


def find_bin_dir(configured: Path | None) -> Path:
    """The configured directory (which must hold pg_ctl), else PostgreSQL 15 on Debian, else the
    highest ``/usr/lib/postgresql/<version>/bin``, else the directory of ``pg_ctl`` on PATH."""
    if configured is not None:
        if not _has_pg_ctl(configured):
            raise PgError(f"postgresql.bin_dir {str(configured)!r} does not contain pg_ctl")
        return configured
    if _has_pg_ctl(DEFAULT_BIN_DIR):
        return DEFAULT_BIN_DIR
    if _DEBIAN_ROOT.is_dir():
        candidates = [
            d / "bin"
            for d in _DEBIAN_ROOT.iterdir()
            if re.fullmatch(r"\d+(\.\d+)?", d.name) and _has_pg_ctl(d / "bin")
        ]
        if candidates:
            return max(candidates, key=lambda b: _version_key(b.parent))
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PgError(
        "PostgreSQL binaries not found: set postgresql.bin_dir "
        f"(looked in {DEFAULT_BIN_DIR}, {_DEBIAN_ROOT}/*/bin and PATH)"
    )


async def run_program(
    argv: list[str],
    *,
    run_as: RunAs,
    timeout: float | None,
    env: Mapping[str, str] | None = None,
    what: str,
) -> Result:
    """Run one PostgreSQL program as ``run_as`` to completion (a failed exit is the caller's to
    judge); :class:`PgError` when it cannot be run or does not finish within ``timeout``."""
    try:
        return await run(argv, run_as=run_as, env=env, timeout=timeout, check=False)
    except TimeoutError as e:
        raise PgError(f"{what}: {Path(argv[0]).name} did not finish within {timeout:.0f}s") from e
    except OSError as e:
        raise PgError(f"{what}: cannot run {argv[0]}: {e}") from e
