"""postgresql.tls: the configuration, the files' checks, the server's parameters, the hostssl
lines for members and the options of every connection to another member."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from hakeeper.core.config import AGENT_OWNED_PARAMETERS, DynamicPostgres, PostgresConfig
from hakeeper.core.pgtypes import Role, Upstream
from hakeeper.pg.conf import render_pg_hba, tls_options
from hakeeper.pg.files import TlsPaths, install_tls_files, render_conf, tls_file_errors
from hakeeper.pg.postgres import Postgres
from hakeeper.pg.session import client_auth_options, conn_kwargs
from hakeeper.util.proc import RunAs

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def tls_files(d: Path, key_mode: int = 0o600) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.crt").write_text(CERT)
    (d / "ca.crt").write_text(CERT)
    key = d / "server.key"
    key.write_text(KEY)
    os.chmod(key, key_mode)
    return {"certfile": str(d / "server.crt"), "keyfile": str(key), "cafile": str(d / "ca.crt")}


def cfg(data_dir: Path, **fields: Any) -> PostgresConfig:
    return PostgresConfig.model_validate(
        {
            "data_dir": data_dir,
            "superuser": {"password": "su-pw"},
            "replication": {"password": "repl-pw"},
            **fields,
        }
    )


def pg_with(tmp_path: Path, **fields: Any) -> Postgres:
    bins = tmp_path / "bin"
    bins.mkdir(exist_ok=True)
    (bins / "pg_ctl").write_text("")
    return Postgres(cfg(tmp_path / "data", bin_dir=bins, **fields), member_name="n2", run_as=RunAs())


# ---------------------------------------------------------------- configuration


def test_tls_needs_all_three_files(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    assert cfg(tmp_path / "data").tls is None
    assert cfg(tmp_path / "data", tls=files).tls is not None
    for missing in files:
        partial = {k: v for k, v in files.items() if k != missing}
        with pytest.raises(ValueError, match=missing):
            cfg(tmp_path / "data", tls=partial)


@pytest.mark.parametrize("name", ["ssl", "ssl_cert_file", "ssl_key_file", "ssl_ca_file"])
def test_ssl_parameters_are_agent_owned(tmp_path: Path, name: str) -> None:
    assert name in AGENT_OWNED_PARAMETERS
    with pytest.raises(ValueError, match="managed by hakeeper"):
        cfg(tmp_path / "data", parameters={name: "x"})
    with pytest.raises(ValueError, match="managed by hakeeper"):
        DynamicPostgres(parameters={name: "x"})


def test_tls_files_checked(tmp_path: Path) -> None:
    good = cfg(tmp_path / "data", tls=tls_files(tmp_path / "good")).tls
    assert good is not None and tls_file_errors(good) == []

    loose = cfg(tmp_path / "data", tls=tls_files(tmp_path / "loose", key_mode=0o640)).tls
    assert loose is not None
    ((field, msg),) = tls_file_errors(loose)
    assert field == "postgresql.tls.keyfile" and "0640" in msg and "chmod 600" in msg

    files = tls_files(tmp_path / "bad")
    Path(files["cafile"]).unlink()
    Path(files["certfile"]).write_text("not a certificate\n")
    Path(files["keyfile"]).write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    bad = cfg(tmp_path / "data", tls=files).tls
    assert bad is not None
    errors = dict(tls_file_errors(bad))
    assert set(errors) == {"postgresql.tls.certfile", "postgresql.tls.keyfile", "postgresql.tls.cafile"}
    assert "no PEM certificate" in errors["postgresql.tls.certfile"]
    assert "encrypted" in errors["postgresql.tls.keyfile"]
    assert "cannot read" in errors["postgresql.tls.cafile"]


def test_config_validate_names_file_and_field_and_exits_2(tmp_path: Path) -> None:
    """The CLI's check: a key others may read stops the agent before it starts anything."""
    files = tls_files(tmp_path / "tls", key_mode=0o644)
    node = tmp_path / "node.yaml"
    node.write_text(
        "scope: s\nname: n1\n"
        "etcd: {hosts: ['127.0.0.1:2379']}\n"
        f"postgresql:\n  data_dir: {tmp_path / 'data'}\n"
        "  superuser: {password: su-pw}\n  replication: {password: repl-pw}\n"
        f"  tls: {{certfile: {files['certfile']}, keyfile: {files['keyfile']}, cafile: {files['cafile']}}}\n"
    )

    def validate() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "hakeeper", "config", "validate", "-c", str(node)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    r = validate()
    assert r.returncode == 2
    assert f"{node}: postgresql.tls.keyfile:" in r.stderr and "0644" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    os.chmod(files["keyfile"], 0o600)
    ok = validate()
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------- rendering


def test_tls_options() -> None:
    assert tls_options(None, 170000) == {}
    assert tls_options("/ca.crt", 150018) == {
        "sslmode": "verify-full",
        "sslrootcert": "/ca.crt",
        "channel_binding": "require",
    }
    assert "channel_binding" not in tls_options("/ca.crt", 120000)  # libpq 12 does not know it
    assert tls_options("/ca.crt", 0)["channel_binding"] == "require"  # unknown: fail closed


def test_members_replicate_only_over_tls() -> None:
    kw: dict[str, Any] = {
        "extra_lines": [],
        "superuser": "postgres",
        "replication_user": "replicator",
        "replication_hosts": ["10.0.0.12", "db3.example.com", "127.0.0.1"],
    }
    rows = [ln.split() for ln in render_pg_hba(**kw, tls=True).split("\n# hakeeper\n")[1].splitlines()]
    repl = {(r[0], r[3]) for r in rows if r[1] == "replication" and r[0] != "local"}
    assert repl == {
        ("host", "127.0.0.1/32"),
        ("host", "::1/128"),
        ("hostssl", "10.0.0.12/32"),
        ("hostssl", "db3.example.com"),
    }
    plain = [ln.split() for ln in render_pg_hba(**kw).split("\n# hakeeper\n")[1].splitlines()]
    assert not [r for r in plain if r[0] == "hostssl"]
    assert all(r[-1] == "scram-sha-256" for r in rows if r[0].startswith("host"))


def _conf(tmp_path: Path, pg: Postgres, up: Upstream) -> dict[str, str]:
    text = render_conf(
        {},
        Role.REPLICA,
        up,
        listen_host="0.0.0.0",
        port=6543,
        socket_dir=tmp_path / "sock",
        replication_user="replicator",
        passfile=pg.pgpass_file,
        application_name="n2",
        conninfo_options=pg.tools_auth_options,
        tls=pg.tls_paths,
    )
    out = {}
    for line in text.splitlines():
        if " = " in line and not line.startswith("#"):
            name, value = line.split(" = ", 1)
            out[name] = value
    return out


def test_server_parameters_and_primary_conninfo_with_tls(tmp_path: Path) -> None:
    pg = pg_with(tmp_path, tls=tls_files(tmp_path / "tls"))
    rt = tmp_path / ".data.hakeeper"
    assert pg.tls_paths == TlsPaths(rt / "tls-server.crt", rt / "tls-server.key", rt / "tls-ca.crt")
    conf = _conf(tmp_path, pg, Upstream("10.0.0.11", 5432, "n2"))
    assert conf["ssl"] == "on"
    assert conf["ssl_cert_file"] == f"'{rt / 'tls-server.crt'}'"
    assert conf["ssl_key_file"] == f"'{rt / 'tls-server.key'}'"
    assert conf["ssl_ca_file"] == f"'{rt / 'tls-ca.crt'}'"
    ci = conninfo_to_dict(conf["primary_conninfo"].strip("'"))
    assert ci["sslmode"] == "verify-full"
    assert ci["sslrootcert"] == str(rt / "tls-ca.crt")
    assert ci["channel_binding"] == "require"
    assert ci["host"] == "10.0.0.11"


def test_nothing_about_tls_without_it(tmp_path: Path) -> None:
    pg = pg_with(tmp_path)
    assert pg.tls_paths is None
    conf = _conf(tmp_path, pg, Upstream("10.0.0.11", 5432, "n2"))
    assert not [n for n in conf if n.startswith("ssl")]
    ci = conninfo_to_dict(conf["primary_conninfo"].strip("'"))
    assert not {"sslmode", "sslrootcert", "channel_binding"} & set(ci)
    assert client_auth_options(None).keys() <= {"require_auth"}


def test_agent_connections_to_members_verify_the_server(tmp_path: Path) -> None:
    c = cfg(tmp_path / "data", tls=tls_files(tmp_path / "tls"))
    assert c.tls is not None
    opts = client_auth_options(c.tls)
    assert opts["sslmode"] == "verify-full"
    assert opts["sslrootcert"] == str(c.tls.cafile)
    assert opts["channel_binding"] == "require"
    # the local session talks to this node's own server (often 127.0.0.1): no verify-full there
    kw = conn_kwargs(c, "127.0.0.1", 5432, statement_timeout_ms=1000, connect_timeout=2)
    assert "sslmode" not in conninfo_to_dict(kw["conninfo"])


def test_install_copies_the_files_private_to_postgres(tmp_path: Path) -> None:
    files = tls_files(tmp_path / "tls")
    pg = pg_with(tmp_path, tls=files)
    asyncio.run(pg.install_tls())
    paths = pg.tls_paths
    assert paths is not None
    for src, dst in zip(
        (files["certfile"], files["keyfile"], files["cafile"]),
        (paths.certfile, paths.keyfile, paths.cafile),
        strict=True,
    ):
        assert dst.read_text() == Path(src).read_text()
        assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert stat.S_IMODE(pg.runtime_dir.stat().st_mode) == 0o700
    # TLS switched off: the copies (the key above all) do not linger
    off = Postgres(pg.cfg.model_copy(update={"tls": None}), member_name="n2", run_as=RunAs())
    asyncio.run(off.install_tls())
    assert not [p for p in (paths.certfile, paths.keyfile, paths.cafile) if p.exists()]


def test_install_refuses_an_unreadable_source(tmp_path: Path) -> None:
    files = tls_files(tmp_path / "tls")
    c = cfg(tmp_path / "data", tls=files)
    assert c.tls is not None
    Path(files["keyfile"]).unlink()
    with pytest.raises(OSError):
        install_tls_files(c.tls, TlsPaths.in_dir(tmp_path / "rt"), RunAs())
