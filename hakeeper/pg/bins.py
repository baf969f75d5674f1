"""Locating the PostgreSQL binaries (initdb, pg_ctl, pg_rewind, ...)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from hakeeper.pg.errors import PgError

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")


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
