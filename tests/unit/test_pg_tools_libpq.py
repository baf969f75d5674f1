"""Which libpq PostgreSQL's own programs load: it decides whether their connection strings may
carry ``require_auth`` (libpq 16+).  The 17 and 18 builds of the tests carry their own libpq
(18's renamed by the wheel's packaging, next to the package), and Debian's 15 uses the system's."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakeeper.localcluster import pgbuilds
from hakeeper.pg.bins import elf_needed_and_paths, linked_libpq, tools_libpq_version
from hakeeper.pg.conf import auth_options


@pytest.mark.parametrize("major", [17, 18])
def test_a_build_with_its_own_libpq_is_judged_by_that_libpq(major: int) -> None:
    bins = pgbuilds.bin_dir(major)
    (lib,) = linked_libpq(bins)
    assert lib.name.startswith("libpq") and lib.is_file()
    version = tools_libpq_version(bins)
    assert major * 10000 <= version < (major + 1) * 10000, version
    # so the members' pg_basebackup, pg_rewind and walreceiver insist on SCRAM
    assert auth_options(version) == {"require_auth": "scram-sha-256"}


def test_the_18_build_names_a_renamed_libpq_found_through_its_rpath() -> None:
    needed, paths = elf_needed_and_paths((pgbuilds.bin_dir(18) / "pg_basebackup").read_bytes())
    (libpq,) = [n for n in needed if n.startswith("libpq")]
    assert libpq != "libpq.so.5"  # the system's libpq.so.5 (15 on Debian 12) is not what it loads
    assert any("$ORIGIN" in p for p in paths)


def test_debian_15_has_no_rpath_and_uses_the_systems_libpq() -> None:
    assert linked_libpq(pgbuilds.bin_dir(15)) == []


def test_a_program_that_is_no_elf_file_links_nothing(tmp_path: Path) -> None:
    (tmp_path / "pg_basebackup").write_text("#!/bin/sh\n")
    assert linked_libpq(tmp_path) == []
    assert linked_libpq(tmp_path / "missing") == []
    with pytest.raises(ValueError):
        elf_needed_and_paths(b"#!/bin/sh\n")
