"""The example files in deploy/ stay valid as the config schema evolves."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

import pytest
import yaml

from hakeeper.core.config import ConfigError, load_node_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODE_FILES = sorted(DEPLOY.glob("node*.yml"))


# The examples' passwords are CHANGE-ME placeholders, which load_node_config refuses; the
# deployment guide fills them in through /etc/hakeeper/env, as these variables do.
FILLED = {
    "HAKEEPER_ETCD__PASSWORD": ("etcd.password", "etcd-secret-1"),
    "HAKEEPER_API__PASSWORD": ("api.password", "api-secret-2"),
    "HAKEEPER_POSTGRESQL__SUPERUSER__PASSWORD": ("postgresql.superuser.password", "su-secret-3"),
    "HAKEEPER_POSTGRESQL__REPLICATION__PASSWORD": ("postgresql.replication.password", "repl-secret-4"),
}


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HAKEEPER_"):
            monkeypatch.delenv(key)
    for key, (_, value) in FILLED.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_node_example_placeholders_are_refused(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied without filling in the passwords, an example fails `config validate`, naming
    every placeholder (and nothing else)."""
    for key in FILLED:
        monkeypatch.delenv(key)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert sorted(field for field, _ in info.value.errors) == sorted(f for f, _ in FILLED.values())
    assert all("placeholder" in msg for _, msg in info.value.errors)


def test_there_are_three_node_examples() -> None:
    assert [p.name for p in NODE_FILES] == ["node1.yml", "node2.yml", "node3.yml"]


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_node_example_is_valid(path: Path) -> None:
    cfg = load_node_config(path)
    assert cfg.scope == "prod-main"
    assert len(cfg.etcd.hosts) == 3
    assert cfg.api.connect_address is not None
    assert cfg.postgresql.connect_address is not None
    for key, (field, value) in FILLED.items():  # the environment's passwords are the ones used
        section, _, name = field.rpartition(".")
        obj: object = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        assert getattr(obj, name).get_secret_value() == value, key


def test_node_examples_agree_and_differ_where_they_must() -> None:
    cfgs = [load_node_config(p) for p in NODE_FILES]
    assert len({c.name for c in cfgs}) == 3
    assert len({c.postgresql.connect_address for c in cfgs}) == 3
    assert len({c.api.connect_address for c in cfgs}) == 3
    assert len({c.scope for c in cfgs}) == 1
    assert len({tuple(c.etcd.hosts) for c in cfgs}) == 1
    assert len({c.bootstrap.dcs.model_dump_json() for c in cfgs}) == 1


def test_etcd_example_lists_three_members() -> None:
    conf = yaml.safe_load((DEPLOY / "etcd.conf.yml").read_text())
    members = conf["initial-cluster"].split(",")
    assert len(members) == 3
    assert conf["name"] in {m.split("=")[0] for m in members}


def test_systemd_unit_runs_the_agent_as_postgres() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "hakeeper-agent.service")
    service = unit["Service"]
    assert service["User"] == "postgres"
    assert service["ExecStart"].split()[1:3] == ["agent", "-c"]
    assert service["KillMode"] in {"mixed", "process"}
    assert service["Restart"] == "on-failure"


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_node_examples_use_etcd_over_tls_with_a_user(path: Path) -> None:
    cfg = load_node_config(path)
    assert all(h.startswith("https://") for h in cfg.etcd.hosts)
    assert cfg.etcd.cacert is not None and cfg.etcd.cert is not None and cfg.etcd.key is not None
    assert cfg.etcd.username == "hakeeper" and cfg.etcd.password is not None
    # The CLI trusts exactly the three members' API addresses.
    assert sorted(cfg.api.client.urls) == sorted(
        f"http://{load_node_config(p).api.connect_address}" for p in NODE_FILES
    )


def test_etcd_example_wants_tls_client_certificates_everywhere() -> None:
    conf = yaml.safe_load((DEPLOY / "etcd.conf.yml").read_text())
    for key in (
        "listen-client-urls",
        "advertise-client-urls",
        "listen-peer-urls",
        "initial-advertise-peer-urls",
    ):
        assert all(u.startswith("https://") for u in conf[key].split(",")), key
    assert all(m.split("=", 1)[1].startswith("https://") for m in conf["initial-cluster"].split(","))
    for section in ("client-transport-security", "peer-transport-security"):
        sec = conf[section]
        assert sec["client-cert-auth"] is True
        assert {"cert-file", "key-file", "trusted-ca-file"} <= set(sec)
    assert conf["enable-grpc-gateway"] is True  # hakeeper's only way in


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_node_examples_archive_and_keep_debians_socket(path: Path) -> None:
    """The guide's cluster archives WAL (a repository in every node file), and the socket is
    also where Debian's psql looks."""
    cfg = load_node_config(path)
    assert [(r.name, r.type, str(r.path)) for r in cfg.backup.repositories] == [
        ("main", "fs", "/srv/pg-backup")
    ]
    assert cfg.postgresql.socket_dirs == ["/var/run/postgresql"]


DOCS = DEPLOY.parent / "docs"


def _fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def test_deployment_guide_haproxy_snippet_is_the_tested_file() -> None:
    """docs/deployment.md shows deploy/haproxy.cfg's services verbatim (the file is what
    tests/integration/test_haproxy.py runs against a real cluster)."""
    (snippet,) = _fenced_blocks((DOCS / "deployment.md").read_text(), "haproxy")
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    assert snippet.startswith("listen postgres_write\n")
    assert cfg.endswith(snippet), "the snippet must be the file's tail, from `listen postgres_write` on"
    assert "listen postgres_read\n" in snippet and "GET /replica?lag=16MB" in snippet


def test_deployment_guide_uses_runuser_not_sudo() -> None:
    text = (DOCS / "deployment.md").read_text()
    commands = "\n".join(_fenced_blocks(text, "sh")) + "\n".join(re.findall(r"`([^`]+)`", text))
    assert "sudo -u" not in commands
    assert "runuser -u postgres -- hakeeper config validate" in text
