"""A node file's unix_socket_directories (issue 13 item 5): rendered after the agent's own
private directory, and the superuser's local lines switch from trust to peer with a map of the
OS users allowed to be the superuser, since pg_hba cannot tell which directory a local
connection came through."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from hakeeper.core.config import PostgresConfig
from hakeeper.core.pgtypes import Role
from hakeeper.pg.conf import IDENT_MAP, first_socket_dir, render_pg_hba, render_pg_ident
from hakeeper.pg.files import render_conf, socket_dir_value
from hakeeper.pg.postgres import Postgres
from hakeeper.util.proc import RunAs


def _conf(socket_dir: Path, extra: list[str], params: dict[str, str] | None = None) -> dict[str, str]:
    text = render_conf(
        params or {},
        Role.PRIMARY,
        None,
        listen_host="127.0.0.1",
        port=5432,
        socket_dir=socket_dir,
        replication_user="replicator",
        passfile=None,
        application_name="n1",
        extra_socket_dirs=extra,
    )
    lines = [ln.split(" = ", 1) for ln in text.splitlines() if " = " in ln and not ln.startswith("#")]
    return {k: v for k, v in lines}


def test_agents_directory_first_then_the_users() -> None:
    conf = _conf(Path("/d/pg_stat_tmp"), ["/var/run/postgresql", "/tmp"])
    assert conf["unix_socket_directories"] == "'/d/pg_stat_tmp,/var/run/postgresql,/tmp'"
    assert _conf(Path("/d/pg_stat_tmp"), [])["unix_socket_directories"] == "'/d/pg_stat_tmp'"


def test_the_users_value_in_params_is_not_rendered_twice() -> None:
    conf = _conf(Path("/d/s"), ["/run/pg"], {"unix_socket_directories": "/run/pg"})
    assert conf["unix_socket_directories"] == "'/d/s,/run/pg'"


def test_an_unusable_directory_is_left_out_not_the_rest() -> None:
    long_dir = "/" + "x" * 120
    assert socket_dir_value(Path(long_dir), 5432, ["/run/pg"]) == "/run/pg"
    assert socket_dir_value(Path("/d/s"), 5432, [long_dir, "/a b"]) == '/d/s,"/a b"'


def test_first_socket_dir() -> None:
    assert first_socket_dir("/d/s,/var/run/postgresql") == "/d/s"
    assert first_socket_dir('"/a b",/run/pg') == "/a b"
    assert first_socket_dir("/tmp") == "/tmp"
    assert first_socket_dir("") == ""


def _local_rows(shared: bool) -> list[list[str]]:
    text = render_pg_hba(
        extra_lines=[],
        superuser="postgres",
        replication_user="rep",
        replication_hosts=[],
        shared_sockets=shared,
    )
    return [ln.split() for ln in text.splitlines() if ln.startswith("local")]


def test_local_lines_trust_only_the_private_directory() -> None:
    assert _local_rows(False) == [
        ["local", "all", '"postgres"', "trust"],
        ["local", "replication", '"postgres"', "trust"],
    ]
    shared = _local_rows(True)
    assert shared == [
        ["local", "all", '"postgres"', "peer", f"map={IDENT_MAP}"],
        ["local", "replication", '"postgres"', "peer", f"map={IDENT_MAP}"],
    ]
    assert not any("trust" in row for row in shared)


def test_ident_map_names_each_os_user_once() -> None:
    text = render_pg_ident(superuser="admin", os_users=["postgres", "root", "postgres"])
    rows = [ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert rows == [[IDENT_MAP, '"postgres"', '"admin"'], [IDENT_MAP, '"root"', '"admin"']]


def _pg(tmp_path: Path, run_as: RunAs, params: dict[str, str | int | float | bool]) -> Postgres:
    bins = tmp_path / "bin"
    bins.mkdir(exist_ok=True)
    (bins / "pg_ctl").write_text("")
    cfg = PostgresConfig.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "bin_dir": str(bins),
            "superuser": {"password": "su"},
            "replication": {"password": "re"},
            "parameters": params,
        }
    )
    return Postgres(cfg, member_name="n1", run_as=run_as)


def test_superuser_os_users_are_postgres_and_the_agent(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    pg = _pg(tmp_path, RunAs(uid=12345, gid=12345, name="postgres"), {"unix_socket_directories": "/run/pg"})
    assert pg.superuser_os_users() == ["postgres", me]
    assert pg.cfg.socket_dirs == ["/run/pg"]
    # not root: the agent is PostgreSQL's OS user itself
    assert _pg(tmp_path, RunAs(), {}).superuser_os_users() == [me, me]
