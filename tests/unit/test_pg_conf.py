from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from hakeeper.core.config import AGENT_OWNED_PARAMETERS, DynamicConfig, PostgresConfig
from hakeeper.core.hba import hba_address, hba_line_problem
from hakeeper.core.pgtypes import Role
from hakeeper.pg.bins import find_bin_dir
from hakeeper.pg.conf import (
    auth_options,
    build_conninfo,
    clean_auto_conf,
    parse_controldata,
    quote_conf_value,
    render_pg_hba,
    render_pgpass,
    render_postgresql_conf,
    sync_guc,
)
from hakeeper.pg.errors import PgError
from hakeeper.pg.files import render_conf, write_files
from hakeeper.pg.postgres import Postgres, Upstream
from hakeeper.pg.probe import state_from_row
from hakeeper.pg.session import conn_kwargs
from hakeeper.util.proc import RunAs

# ---------------------------------------------------------------- a postgresql.conf reader
# Mirrors PostgreSQL 15's guc-file.l: the STRING token and GUC_scanstr().

_STRING_RE = re.compile(r"'([^'\\\n]|\\.|'')*'")


def scan_conf_string(token: str) -> str:
    assert _STRING_RE.fullmatch(token), token
    s = token[1:-1]
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 1
            e = s[i]
            if e in "bfnrt":
                out.append({"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}[e])
            elif e in "01234567":
                j = i
                while j < len(s) and j < i + 3 and s[j] in "01234567":
                    j += 1
                out.append(chr(int(s[i:j], 8)))
                i = j - 1
            else:
                out.append(e)
        elif c == "'" and i + 1 < len(s) and s[i + 1] == "'":
            out.append("'")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def read_conf(text: str) -> dict[str, str]:
    out = {}
    for line in text.split("\n"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.partition(" = ")
        out[name] = scan_conf_string(value) if value.startswith("'") else value
    return out


text_no_nul = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


@given(text_no_nul)
def test_quoted_string_round_trips(value: str) -> None:
    quoted = quote_conf_value(value)
    assert "\n" not in quoted
    assert scan_conf_string(quoted) == value


@given(st.text(alphabet="'\\\n\r ab", max_size=30))
def test_quotes_and_backslashes_round_trip(value: str) -> None:
    assert scan_conf_string(quote_conf_value(value)) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "on"),
        (False, "off"),
        (0, "0"),
        (-5, "-5"),
        (100, "100"),
        ("128MB", "'128MB'"),
        ("", "''"),
        ("it's", "'it''s'"),
        ("a\\b", "'a\\\\b'"),
        ("two\nlines", "'two\\nlines'"),
        (0.5, "'0.5'"),
        (1e-05, "'1e-05'"),
    ],
)
def test_quote_conf_value(value: str | int | float | bool, expected: str) -> None:
    assert quote_conf_value(value) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nul\x00here"])
def test_quote_conf_value_rejects(bad: str | float) -> None:
    with pytest.raises(ValueError):
        quote_conf_value(bad)


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True), text_no_nul, max_size=8))
def test_render_postgresql_conf_round_trips(params: dict[str, str]) -> None:
    text = render_postgresql_conf(params)
    assert text.startswith("#")
    assert "managed by hakeeper, edits are overwritten" in text
    assert read_conf(text) == params


def test_render_postgresql_conf_values_and_order() -> None:
    text = render_postgresql_conf({"b_param": 1, "a_param": True, "hakeeper.custom": "x y"})
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == ["b_param = 1", "a_param = on", "hakeeper.custom = 'x y'"]


@pytest.mark.parametrize("name", ["", "bad name", "x\ny", "1abc", "a=b", "a.b.c"])
def test_render_postgresql_conf_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        render_postgresql_conf({name: 1})


# ---------------------------------------------------------------- conninfo

conninfo_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)


@given(host=conninfo_text, user=conninfo_text, password=conninfo_text, app=conninfo_text)
def test_conninfo_round_trips_through_libpq(host: str, user: str, password: str, app: str) -> None:
    kw = {"host": host, "user": user, "password": password, "application_name": app}
    assert conninfo_to_dict(build_conninfo(**kw)) == kw


def test_conninfo_examples() -> None:
    assert build_conninfo(host="10.0.0.1", port=5432, user="rep") == "host=10.0.0.1 port=5432 user=rep"
    assert build_conninfo(host="h", sslmode=None) == "host=h"
    assert build_conninfo(password="a b'c\\") == "password='a b\\'c\\\\'"
    assert build_conninfo(dbname="") == "dbname=''"
    assert build_conninfo(passfile="/data dir/x.pgpass") == "passfile='/data dir/x.pgpass'"


@pytest.mark.parametrize(("key", "value"), [("bad key", "x"), ("Host", "x"), ("host", "a\x00b")])
def test_conninfo_rejects(key: str, value: str) -> None:
    with pytest.raises(ValueError):
        build_conninfo(**{key: value})


def test_conninfo_inside_postgresql_conf_round_trips() -> None:
    """primary_conninfo is quoted twice (libpq inside postgresql.conf)."""
    ci = build_conninfo(host="h", user="o'brien", application_name="a\\b c")
    assert conninfo_to_dict(scan_conf_string(quote_conf_value(ci))) == {
        "host": "h",
        "user": "o'brien",
        "application_name": "a\\b c",
    }


# ---------------------------------------------------------------- pg_hba


def _hba_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _agent_rows(text: str) -> list[list[str]]:
    """The rows after the agent's own ``# hakeeper`` marker."""
    return _hba_rows(text.split("\n# hakeeper\n", 1)[1])


def _replication_addrs(text: str) -> set[str]:
    return {r[3] for r in _agent_rows(text) if r[0] == "host" and r[1] == "replication"}


def test_pg_hba_scram_everywhere_and_replication_from_members_only() -> None:
    text = render_pg_hba(
        extra_lines=["host all app 10.0.0.0/8 scram-sha-256", "hostssl all all 0.0.0.0/0 cert"],
        superuser="postgres",
        replication_user="replicator",
        replication_hosts=["10.0.0.12", "db3.example.com", "fe80::1", "10.0.0.12", "127.0.0.1"],
    )
    assert "managed by hakeeper" in text
    rows = _hba_rows(text)
    assert rows[0] == ["host", "all", "app", "10.0.0.0/8", "scram-sha-256"]
    assert rows[1] == ["hostssl", "all", "all", "0.0.0.0/0", "cert"]
    assert ["local", "all", '"postgres"', "trust"] in rows
    assert _replication_addrs(text) == {
        "127.0.0.1/32",
        "::1/128",
        "10.0.0.12/32",
        "db3.example.com",
        "fe80::1/128",
    }
    for r in _agent_rows(text):
        if r[0] == "host":
            assert r[-1] == "scram-sha-256", r
        if r[1] == "replication" and r[0] == "host":
            assert r[2] == '"replicator"'
    for net in ("127.0.0.1/32", "::1/128", "0.0.0.0/0", "::/0"):
        assert ["host", "all", "all", net, "scram-sha-256"] in rows
    assert not any(r[0] == "host" and r[1] == "replication" and r[3] in ("0.0.0.0/0", "::/0") for r in rows)


def test_pg_hba_without_members_admits_replication_from_loopback_only() -> None:
    text = render_pg_hba(extra_lines=[], superuser="admin", replication_user="rep", replication_hosts=[])
    assert _replication_addrs(text) == {"127.0.0.1/32", "::1/128"}
    assert [r for r in _hba_rows(text) if r[-1] == "trust"] == [
        ["local", "all", '"admin"', "trust"],
        ["local", "replication", '"admin"', "trust"],
    ]


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0/0",  # a network, not a host
        "10.0.0.0/8",
        "all",  # pg_hba keywords
        "samenet",
        "SameHost",
        ".example.com",  # a suffix pattern
        "10.1",  # libc reads these as IPv4 addresses without a mask: the file would not load
        "1234",
        "0x7f.1",
        "fe80::1%eth0",
        "a b",
        'x"y',
        "x#y",
        "host\nall",
        "",
        "a" * 300,
    ],
)
def test_hostile_member_hosts_are_not_admitted(host: str) -> None:
    assert hba_address(host) is None
    text = render_pg_hba(extra_lines=[], superuser="p", replication_user="r", replication_hosts=[host, "db1"])
    assert _replication_addrs(text) == {"127.0.0.1/32", "::1/128", "db1"}


def test_hba_address_forms() -> None:
    assert hba_address("10.0.0.11") == "10.0.0.11/32"
    assert hba_address("2001:db8::0:1") == "2001:db8::1/128"
    assert hba_address("localhost") == "localhost"
    assert hba_address("db-1.prod.example") == "db-1.prod.example"
    assert hba_address("node1") == "node1"


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("host all all 0.0.0.0/0 trust", True),
        ("HOSTSSL all all 10.0.0.0/8 Trust", True),
        ("hostnossl all all 10.0.0.0 255.0.0.0 trust # legacy", True),
        ("host all all 0.0.0.0/0 scram-sha-256 \\", True),  # would swallow the next line
        ("host all all 0.0.0.0/0 md5\nhost all all ::/0 trust", True),
        ("local all all trust", False),  # the socket directory is private
        # quoting hides nothing: PostgreSQL compares the type and the method unquoted (hba.c)
        ('host all all 0.0.0.0/0 "trust"', True),
        ('"host" all all 0.0.0.0/0 trust', True),
        ('host all all 0.0.0.0/0 tr"us"t', True),
        ('host all all 0.0.0.0/0 "trust', True),  # unterminated: PostgreSQL would refuse the file
        ('host"trust', True),
        ("hosthost all all 0.0.0.0/0 scram-sha-256", True),  # PostgreSQL would refuse the file
        ("include_dir conf.d", False),
        # a role named trust on a TCP line is refused too: the method column is not parsed exactly
        ('host all "trust" 10.0.0.0/8 scram-sha-256', True),
        ('local all "trust" peer', False),
        ("host all all 10.0.0.0/8 scram-sha-256 # not trust", False),
        ("# host all all 0.0.0.0/0 trust", False),
        ("", False),
    ],
)
def test_hba_line_problem(line: str, refused: bool) -> None:
    assert (hba_line_problem(line) is not None) == refused
    if refused:
        with pytest.raises(ValueError):
            render_pg_hba(extra_lines=[line], superuser="p", replication_user="r", replication_hosts=[])


def _pg_tokens(line: str) -> list[str]:
    """pg_hba.conf's fields as PostgreSQL's tokenizer reads them: split at blanks and commas
    outside double quotes, the quotes dropped (``"tr"ust`` is ``trust``), ``#`` outside quotes
    ends the line."""
    tokens: list[str] = []
    cur, in_quotes, seen = "", False, False
    for ch in line:
        if ch == '"':
            in_quotes, seen = not in_quotes, True
        elif not in_quotes and ch == "#":
            break
        elif not in_quotes and ch in " \t,":
            if cur or seen:
                tokens.append(cur)
            cur, seen = "", False
        else:
            cur += ch
    if cur or seen:
        tokens.append(cur)
    return tokens


def _tcp_trust_lines(text: str) -> list[str]:
    # the connection type and the method are compared without regard to quoting (hba.c)
    bad = []
    for line in text.split("\n"):
        tokens = _pg_tokens(line)
        tcp = ("host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc")
        if tokens and tokens[0].lower() in tcp and "trust" in (t.lower() for t in tokens[1:]):
            bad.append(line)
    return bad


_ip4 = st.ip_addresses(v=4).map(str)
_ip6 = st.ip_addresses(v=6).map(str)
_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=3).map(".".join)
_junk = st.sampled_from(["0.0.0.0/0", "::/0", "all", "samenet", ".x.org", "10.1", "a b", "x\ny", "", "trust"])
_hba_word = st.sampled_from(
    [
        "host",
        "hostssl",
        "local",
        "all",
        "trust",
        '"trust"',
        "scram-sha-256",
        "0.0.0.0/0",
        "#",
        '"',
        "\\",
        "\n",
        " ",
        ",",
    ]
)


@given(
    members=st.lists(st.one_of(_ip4, _ip6, _names, _junk), max_size=8),
    extra=st.lists(st.lists(_hba_word, max_size=7).map("".join), max_size=4),
)
def test_no_trust_on_any_tcp_line_and_replication_exactly_from_members(
    members: list[str], extra: list[str]
) -> None:
    try:
        text = render_pg_hba(
            extra_lines=extra, superuser="postgres", replication_user="replicator", replication_hosts=members
        )
    except ValueError:
        # Only an extra line is ever refused, and only one that hba_line_problem names.
        assert any(hba_line_problem(line) is not None for line in extra)
        return
    assert _tcp_trust_lines(text) == []
    expected = {"127.0.0.1/32", "::1/128"}
    for m in members:
        try:
            ip = ipaddress.ip_address(m)
        except ValueError:
            if (
                m not in ("all", "samenet", "trust")
                and re.fullmatch(r"[a-z][a-z0-9.-]*", m)
                and ".." not in m
            ):
                expected.add(m)
        else:
            expected.add(f"{ip.compressed}/{ip.max_prefixlen}")
    assert _replication_addrs(text) == expected


@pytest.mark.parametrize("name", ['we"ird', "a\nb", ""])
def test_pg_hba_rejects_unwritable_names(name: str) -> None:
    with pytest.raises(ValueError):
        render_pg_hba(extra_lines=[], superuser=name, replication_user="r", replication_hosts=[])


def test_pg_hba_rejects_multiline_extra() -> None:
    with pytest.raises(ValueError):
        render_pg_hba(
            extra_lines=["host all all 0.0.0.0/0 scram-sha-256\nlocal all all trust"],
            superuser="p",
            replication_user="r",
            replication_hosts=[],
        )


# ---------------------------------------------------------------- require_auth


def test_require_auth_only_for_a_libpq_that_knows_it() -> None:
    assert auth_options(160000) == {"require_auth": "scram-sha-256"}
    assert auth_options(180006) == {"require_auth": "scram-sha-256"}
    assert auth_options(150018) == {}  # PostgreSQL 15's libpq: "invalid connection option"
    assert auth_options(0) == {}  # unknown


def test_primary_conninfo_carries_require_auth_when_supported(tmp_path: Path) -> None:
    up = Upstream("10.0.0.11", 5432, "node2")
    for options, expected in (({"require_auth": "scram-sha-256"}, "scram-sha-256"), ({}, None)):
        conf = render_conf(
            {},
            Role.REPLICA,
            up,
            listen_host="127.0.0.1",
            port=5433,
            socket_dir=tmp_path,
            replication_user="replicator",
            passfile=tmp_path / "pgpass",
            application_name="node2",
            conninfo_options=options,
        )
        (line,) = [ln for ln in conf.splitlines() if ln.startswith("primary_conninfo")]
        parsed = conninfo_to_dict(scan_conf_string(line.split(" = ", 1)[1]))
        assert parsed.get("require_auth") == expected
        assert parsed["passfile"] == str(tmp_path / "pgpass")
        assert "password" not in parsed


def test_agent_connections_require_scram_with_this_psycopg() -> None:
    """psycopg-binary bundles a libpq >= 16 here; the branch without it is tested above."""
    kw = conn_kwargs(_cfg(Path("/x")), "127.0.0.1", 5432, statement_timeout_ms=1000, connect_timeout=2)
    parsed = conninfo_to_dict(kw["conninfo"])
    if psycopg.pq.version() >= 160000:
        assert parsed["require_auth"] == "scram-sha-256"
    else:
        assert "require_auth" not in parsed
    # our own Unix socket (the bootstrap from a backup uses it): pg_hba trusts the superuser there
    kw = conn_kwargs(_cfg(Path("/x")), "/x/pg_stat_tmp", 5432, statement_timeout_ms=1000, connect_timeout=2)
    assert "require_auth" not in conninfo_to_dict(kw["conninfo"])


# ---------------------------------------------------------------- postgresql.auto.conf


def test_clean_auto_conf_removes_agent_owned_lines() -> None:
    text = (
        "# Do not edit this file manually!\n"
        "# It will be overwritten by the ALTER SYSTEM command.\n"
        "work_mem = '64MB'\n"
        "primary_conninfo = 'host=old port=5432 user=replicator'\n"
        "PRIMARY_SLOT_NAME = 'node2'\n"
        "  port=5999\n"
        "listen_addresses '*'\n"
        "port_extra = 'kept'\n"
        "# port = 1 (a comment stays)\n"
        "log_min_duration_statement = 250\n"
    )
    assert clean_auto_conf(text) == (
        "# Do not edit this file manually!\n"
        "# It will be overwritten by the ALTER SYSTEM command.\n"
        "work_mem = '64MB'\n"
        "port_extra = 'kept'\n"
        "# port = 1 (a comment stays)\n"
        "log_min_duration_statement = 250\n"
    )


@given(st.lists(st.sampled_from(sorted(AGENT_OWNED_PARAMETERS | {"work_mem", "shared_buffers"}))))
def test_clean_auto_conf_property(names: list[str]) -> None:
    text = "".join(f"{n} = 'v'\n" for n in names)
    kept = clean_auto_conf(text)
    assert [line.split(" = ")[0] for line in kept.splitlines()] == [
        n for n in names if n not in AGENT_OWNED_PARAMETERS
    ]
    assert clean_auto_conf(kept) == kept


def test_clean_auto_conf_splits_only_on_newline() -> None:
    text = "application_name = 'a\x1eport = 1\u2028b'\nport = 5\n"
    assert clean_auto_conf(text) == "application_name = 'a\x1eport = 1\u2028b'\n"


# ---------------------------------------------------------------- misc


def test_pgpass_escaping() -> None:
    assert render_pgpass([("*", "*", "*", "rep", "p:w\\d")]) == "*:*:*:rep:p\\:w\\\\d\n"
    with pytest.raises(ValueError):
        render_pgpass([("*", "*", "*", "rep", "two\nlines")])


def test_parse_controldata() -> None:
    out = parse_controldata(
        "pg_control version number:            1300\n"
        "Database system identifier:           7312345678901234567\n"
        "Database cluster state:               in production\n"
        "Time of latest checkpoint:            Mon 01 Jan 2024 10:00:00 AM UTC\n"
        "Latest checkpoint's TimeLineID:       2\n"
    )
    assert out["Database system identifier"] == "7312345678901234567"
    assert out["Database cluster state"] == "in production"
    assert out["Time of latest checkpoint"] == "Mon 01 Jan 2024 10:00:00 AM UTC"
    assert out["Latest checkpoint's TimeLineID"] == "2"


def test_find_bin_dir(tmp_path: Path) -> None:
    with pytest.raises(PgError, match="does not contain pg_ctl"):
        find_bin_dir(tmp_path)
    (tmp_path / "pg_ctl").write_text("")
    assert find_bin_dir(tmp_path) == tmp_path


# ---------------------------------------------------------------- probe row -> LocalState


def _cfg(data_dir: Path, **fields: object) -> PostgresConfig:
    return PostgresConfig.model_validate(
        {
            "data_dir": data_dir,
            "superuser": {"password": "su-pw"},
            "replication": {"password": "repl-pw"},
            **fields,
        }
    )


def _pg(tmp_path: Path) -> Postgres:
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "pg_ctl").write_text("")
    return Postgres(
        _cfg(tmp_path / "data", bin_dir=bins, listen="0.0.0.0:6543"), member_name="n1", run_as=RunAs()
    )


def test_probe_row_primary(tmp_path: Path) -> None:
    pg = _pg(tmp_path)
    assert pg.session.host == "127.0.0.1" and pg.port == 6543
    repl = [
        {
            "application_name": "n2",
            "state": "streaming",
            "sync_state": "async",
            "sent_lsn": "0/3000100",
            "write_lsn": "0/3000100",
            "flush_lsn": "0/3000000",
            "replay_lsn": None,
            "replay_lag": 0.25,
            "client_addr": "127.0.0.1",
        }
    ]
    row = (
        False,
        "0/3000100",
        "000000030000000000000003",
        "0/2000000",
        "0/2000000",
        2,
        0,
        None,
        None,
        repl,
        str(tmp_path / "data"),
        ["max_connections", "shared_buffers"],
    )
    st = state_from_row(row, data_dir=pg.data_dir, port=pg.port)
    assert st.pending_restart == ("max_connections", "shared_buffers")
    assert st.running and st.in_recovery is False and st.error is None
    assert st.timeline == 3  # from the WAL file name, not the (older) checkpoint timeline
    assert st.wal_lsn == 0x3000100
    # stale receive/replay positions of a promoted replica are not reported
    assert st.received_lsn is None and st.replayed_lsn is None and st.streaming_from is None
    (r,) = st.replication
    assert r.application_name == "n2" and r.flush_lsn == 0x3000000 and r.replay_lsn is None
    assert r.replay_lag == 0.25


def test_probe_row_replica(tmp_path: Path) -> None:
    pg = _pg(tmp_path)
    dd = str(tmp_path / "data")
    receiver = {"status": "streaming", "tli": 4, "host": "10.0.0.1", "port": 5432}
    st = state_from_row(
        (True, None, None, "0/5000000", "0/4FFFF00", 3, 3, 3, receiver, [], dd, ["wal_level"]),
        data_dir=pg.data_dir,
        port=pg.port,
    )
    assert st.in_recovery is True and st.timeline == 4
    assert st.pending_restart == ("wal_level",)
    assert st.received_lsn == 0x5000000 and st.replayed_lsn == 0x4FFFF00 and st.wal_lsn == 0x5000000
    assert st.streaming_from == Upstream("10.0.0.1", 5432, "x").address == "10.0.0.1:5432"
    # not streaming: pg_control's timelines are lower bounds, received may be NULL
    st = state_from_row(
        (True, None, None, None, "0/4FFFF00", 2, 3, None, None, [], dd, []),
        data_dir=pg.data_dir,
        port=pg.port,
    )
    assert st.timeline == 3 and st.wal_lsn == 0x4FFFF00 and st.streaming_from is None
    assert st.pending_restart == ()
    # upstream gone right after a timeline switch: the newest history file in pg_wal wins
    st = state_from_row(
        (True, None, None, None, "0/4FFFF00", 1, 1, 2, None, [], dd, []), data_dir=pg.data_dir, port=pg.port
    )
    assert st.timeline == 2
    v6 = {"status": "streaming", "tli": 1, "host": "::1", "port": 5433}
    st = state_from_row(
        (True, None, None, "0/1", "0/1", 1, 0, None, v6, [], dd, []), data_dir=pg.data_dir, port=pg.port
    )
    assert st.streaming_from == "[::1]:5433" == Upstream("::1", 5433, None).address


def test_probe_row_from_another_server(tmp_path: Path) -> None:
    pg = _pg(tmp_path)
    st = state_from_row(
        (False, "0/1", "000000010000000000000001", None, None, 1, 0, None, None, [], "/somewhere/else", []),
        data_dir=pg.data_dir,
        port=pg.port,
    )
    assert st.running is False and st.error and "another PostgreSQL" in st.error


# ---------------------------------------------------------------- synchronous_standby_names

SYNC = DynamicConfig(replication_mode="synchronous")
QUORUM = DynamicConfig(replication_mode="quorum", synchronous_node_count=2)


def test_guc_lists_exactly_the_sync_set_so_every_member_acknowledges_every_commit() -> None:
    assert sync_guc(SYNC, ("b", "c")) == 'FIRST 2 ("b", "c")'
    assert sync_guc(SYNC, ()) == ""
    assert sync_guc(DynamicConfig(replication_mode="synchronous", synchronous_strict=True), ()) == "*"
    assert sync_guc(DynamicConfig(), ("b",)) == ""
    assert sync_guc(SYNC, ('we"ird',)) == 'FIRST 1 ("we""ird")'


def test_a_new_primary_waits_for_any_standby_until_its_sync_set_forms() -> None:
    """The promotion guard: no commit of a new primary is acknowledged by it alone."""
    assert sync_guc(SYNC, (), guard=True) == "*"
    assert sync_guc(QUORUM, (), guard=True) == "*"
    assert sync_guc(SYNC, ("b",), guard=True) == 'FIRST 1 ("b")'  # a formed set replaces it
    assert sync_guc(DynamicConfig(), (), guard=True) == ""  # async mode never waits


def test_quorum_guc_is_any_k_over_the_voters() -> None:
    assert sync_guc(QUORUM, ("b", "c", "d"), 2) == 'ANY 2 ("b", "c", "d")'
    assert sync_guc(QUORUM, ("b",), 2) == 'ANY 1 ("b")'  # k never exceeds the voters
    assert sync_guc(QUORUM, ("b", "c"), 0) == 'ANY 2 ("b", "c")'  # 0: all (as FIRST mode left it)
    assert sync_guc(QUORUM, ()) == ""
    assert sync_guc(DynamicConfig(replication_mode="quorum", synchronous_strict=True), ()) == "*"


# ---------------------------------------------------------------- files: the passfile and the socket


def test_pgpass_lives_outside_the_data_directory(tmp_path: Path) -> None:
    """Every clone and base backup copies the data directory: the replication password must
    not be in it.  A passfile an older version left there is removed on the next write."""
    pg = _pg(tmp_path)
    d = pg.data_dir
    (d / "pg_stat_tmp").mkdir(parents=True, mode=0o750)
    os.chmod(d / "pg_stat_tmp", 0o750)
    (d / "hakeeper.pgpass").write_text("*:*:*:replicator:old-secret\n")
    assert pg.pgpass_file == tmp_path / ".data.hakeeper" / "hakeeper.pgpass"
    assert not pg.pgpass_file.is_relative_to(d)
    write_files(
        d,
        RunAs(),
        conf="port = 6543\n",
        hba="# hba\n",
        ident="# ident\n",
        pgpass=render_pgpass([("*", "*", "*", "replicator", "repl-pw")]),
        pgpass_file=pg.pgpass_file,
        socket_dir=pg.socket_dir,
        role=Role.REPLICA,
    )
    assert pg.pgpass_file.read_text() == "*:*:*:replicator:repl-pw\n"
    assert stat.S_IMODE(pg.pgpass_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pg.runtime_dir.stat().st_mode) == 0o700
    assert not (d / "hakeeper.pgpass").exists()
    for f in d.rglob("*"):
        if f.is_file():
            assert b"repl-pw" not in f.read_bytes() and b"old-secret" not in f.read_bytes(), f
    # the superuser's socket is trusted: its directory is made private again on every write
    assert stat.S_IMODE(pg.socket_dir.stat().st_mode) == 0o700
