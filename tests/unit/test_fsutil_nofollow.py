"""The no-follow helpers of hakeeper.util.fsutil: what root mode relies on (a link the PostgreSQL
user planted is never opened, chmod-ed or chown-ed through)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hakeeper.util.fsutil import (
    UnsafePathError,
    ensure_dir,
    ensure_dir_fd,
    ensure_private_dir,
    open_nofollow,
    read_regular,
    write_new,
)
from hakeeper.util.proc import RunAs


def _victim(tmp_path: Path) -> tuple[Path, os.stat_result]:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o750)
    (victim / "file").write_text("secret")
    os.chmod(victim / "file", 0o640)
    return victim, victim.stat()


def test_ensure_dir_refuses_a_link_and_leaves_its_target(tmp_path: Path) -> None:
    victim, before = _victim(tmp_path)
    (tmp_path / "log").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ensure_dir(tmp_path / "log", mode=0o700, owner=RunAs())
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)


def test_ensure_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_dir(tmp_path / "log")


def test_ensure_dir_creates_and_fixes_mode(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    ensure_dir(d, mode=0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    fd = ensure_dir_fd("sub", mode=0o700, dir_fd=os.open(d, os.O_RDONLY))
    os.close(fd)
    assert (d / "sub").is_dir()


def test_open_nofollow_and_read_regular_refuse_links_and_fifos(tmp_path: Path) -> None:
    victim, _ = _victim(tmp_path)
    link = tmp_path / "000000010000000000000001"
    link.symlink_to(victim / "file")
    with pytest.raises(UnsafePathError):
        read_regular(link)
    with pytest.raises(UnsafePathError):
        open_nofollow(link, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    assert (victim / "file").read_text() == "secret"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_regular(fifo)
    (tmp_path / "plain").write_bytes(b"abc")
    assert read_regular(tmp_path / "plain") == b"abc"


def test_write_new_replaces_a_planted_link_without_writing_through_it(tmp_path: Path) -> None:
    victim, _ = _victim(tmp_path)
    d = tmp_path / "out"
    d.mkdir()
    (d / "pid").symlink_to(victim / "file")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_new("pid", b"123\n", dir_fd=fd, mode=0o644)
    finally:
        os.close(fd)
    assert not (d / "pid").is_symlink() and (d / "pid").read_text() == "123\n"
    assert (victim / "file").read_text() == "secret"
    assert [p.name for p in d.iterdir()] == ["pid"]


def test_ensure_private_dir_refuses_a_link(tmp_path: Path) -> None:
    victim, before = _victim(tmp_path)
    (tmp_path / ".data.hakeeper").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        ensure_private_dir(tmp_path / ".data.hakeeper")
    assert victim.stat().st_mode == before.st_mode


def test_ensure_private_dir_sets_mode(tmp_path: Path) -> None:
    d = tmp_path / "a" / ".data.hakeeper"
    ensure_private_dir(d, mode=0o711)
    st = d.stat()
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="taking a directory back from another user needs root")
def test_ensure_private_dir_takes_back_a_foreign_dir_and_drops_its_links(tmp_path: Path) -> None:
    victim, _ = _victim(tmp_path)
    d = tmp_path / ".data.hakeeper"
    d.mkdir()
    os.chown(d, 65534, 65534)
    (d / "agent.lock").symlink_to(victim / "file")
    (d / "fence.json").write_text("{}")
    os.chown(d / "fence.json", 65534, 65534)
    (d / "fencer.log").write_text("")
    ensure_private_dir(d)
    assert d.stat().st_uid == 0 and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in d.iterdir()) == ["fencer.log"]
    assert (victim / "file").read_text() == "secret"
