"""Which PostgreSQL major the binaries are and which one a data directory holds.

A data directory can only be run by binaries of the major that created it (``PG_VERSION``, a
file initdb writes with the bare major, e.g. ``17``); started by another major the postmaster
exits with "database files are incompatible with server" and the agent would retry forever.
So the agent compares both before it starts (:func:`version_errors`) and refuses a mismatch
with the file and field to fix.

``postgres --version`` prints e.g. ``postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)``,
``postgres (PostgreSQL) 17.10`` or ``postgres (PostgreSQL) 19beta1``.  :func:`binaries_version`
runs it once per directory (blocking: call it before the event loop runs, or in a thread).

Majors 15 to 18 are accepted; 15, 17 and 18 are tested (docs/versions.md).  Below 15 is refused
(the agent relies on e.g. ``pg_stat_wal_receiver`` columns and ``pg_ls_waldir``'s permissions
of 15), above 18 too until it has been looked at: a new major renames settings and views."""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hakeeper.core.config import PostgresConfig
from hakeeper.pg.errors import PgError

__all__ = [
    "MAX_MAJOR",
    "MIN_MAJOR",
    "TESTED_MAJORS",
    "PgVersion",
    "binaries_version",
    "data_dir_major",
    "major_refusal",
    "mismatch_message",
    "parse_pg_version_file",
    "parse_version_output",
    "server_version_text",
    "version_errors",
]

MIN_MAJOR = 15
MAX_MAJOR = 18
TESTED_MAJORS = (15, 17, 18)  # CI runs these; 16 is accepted but not tested
VERSION_TIMEOUT = 10.0  # seconds for `postgres --version` (a cold NFS mount of the binaries)

# "postgres (PostgreSQL) 17.10", "... 15.18 (Debian ...)", "... 18beta1", "... 19devel"
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?([a-z]+\d*)?")


@dataclass(frozen=True, slots=True)
class PgVersion:
    """A PostgreSQL release: ``major`` (17) and the text users know (``17.10``, ``18beta1``)."""

    major: int
    text: str


def parse_version_output(output: str) -> PgVersion:
    """The release of ``postgres --version``'s output; :class:`PgError` if it is not one."""
    m = _VERSION_RE.search(output)
    if m is None:
        raise PgError(f"cannot read a PostgreSQL version in {output.strip()[:200]!r}")
    major, minor, suffix = int(m.group(1)), m.group(2), m.group(3)
    if major < 10:  # 9.6 and before: the major is two numbers, and long out of support anyway
        return PgVersion(major, f"{major}.{minor or 0}")
    return PgVersion(major, f"{major}.{minor}" if minor is not None else f"{major}{suffix or ''}")


def parse_pg_version_file(text: str) -> int:
    """The major in a ``PG_VERSION`` file (``17``; ``9.6`` before PostgreSQL 10 reads as 9)."""
    m = re.fullmatch(r"\s*(\d+)(?:\.\d+)?\s*", text)
    if m is None:
        raise PgError(f"PG_VERSION holds {text.strip()[:40]!r}, not a PostgreSQL major")
    return int(m.group(1))


def server_version_text(num: int) -> str:
    """``server_version_num`` (``170010``, what libpq reports) as ``17.10``."""
    if num >= 100000:
        return f"{num // 10000}.{num % 10000}"
    return f"{num // 10000}.{num // 100 % 100}"  # 9.6.24 = 90624: the major is 9.6


@functools.cache
def binaries_version(bin_dir: Path) -> PgVersion:
    """The release of the ``postgres`` in ``bin_dir`` (run once per directory; blocking)."""
    postgres = bin_dir / "postgres"
    try:
        done = subprocess.run(
            [str(postgres), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
            env={"LC_ALL": "C", "LANG": "C", "PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PgError(f"cannot run {postgres} --version: {e}") from e
    if done.returncode != 0:
        raise PgError(f"{postgres} --version exited with {done.returncode}: {done.stderr.strip()[:200]}")
    return parse_version_output(done.stdout)


def data_dir_major(data_dir: Path) -> int | None:
    """The major of the cluster in ``data_dir`` (its ``PG_VERSION``); None when there is none
    (not initialized yet) or it cannot be read (another user's directory, for a CLI command)."""
    try:
        text = (data_dir / "PG_VERSION").read_text()
    except OSError:
        return None
    return parse_pg_version_file(text)


def major_refusal(version: PgVersion) -> str | None:
    """Why the agent cannot run PostgreSQL ``version``, or None when it can."""
    if version.major < MIN_MAJOR:
        return (
            f"is PostgreSQL {version.text}; hakeeper needs PostgreSQL {MIN_MAJOR} or later "
            f"(tested: {', '.join(map(str, TESTED_MAJORS))})"
        )
    if version.major > MAX_MAJOR:
        return (
            f"is PostgreSQL {version.text}, newer than this hakeeper knows (up to {MAX_MAJOR}): "
            "upgrade hakeeper first"
        )
    return None


def mismatch_message(bin_dir: Path, binaries: PgVersion, data_dir: Path, data_major: int) -> str:
    return (
        f"{bin_dir} is PostgreSQL {binaries.major}, but postgresql.data_dir {data_dir} holds a "
        f"PostgreSQL {data_major} cluster (PG_VERSION); point bin_dir at PostgreSQL {data_major} "
        "binaries or run a major upgrade"
    )


def version_errors(cfg: PostgresConfig, bin_dir: Path) -> list[tuple[str, str]]:
    """What keeps the agent from running ``cfg``'s data directory with the binaries in
    ``bin_dir``, as (field, message) pairs like a :class:`~hakeeper.core.config.ConfigError`'s:
    binaries of an unsupported major, or of another major than the data directory's."""
    try:
        binaries = binaries_version(bin_dir)
    except PgError as e:
        return [("postgresql.bin_dir", str(e))]
    refusal = major_refusal(binaries)
    if refusal is not None:
        return [("postgresql.bin_dir", f"{bin_dir} {refusal}")]
    data_dir = Path(cfg.data_dir)
    try:
        data_major = data_dir_major(data_dir)
    except PgError as e:
        return [("postgresql.data_dir", f"{data_dir}: {e}")]
    if data_major is not None and data_major != binaries.major:
        return [("postgresql.bin_dir", mismatch_message(bin_dir, binaries, data_dir, data_major))]
    return []
