"""Node config validation: every error names the file and the field; the CLI exits 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hakeeper.core.config import ConfigError, DynamicConfig, load_node_config, parse_dynamic_config
from hakeeper.core.config_docs import render
from hakeeper.core.fencing import FENCER_KILL_GRACE, FENCER_POLL, min_fence_margin

GOOD = """
scope: demo
name: node1
etcd:
  hosts: ["127.0.0.1:2379"]
postgresql:
  data_dir: /tmp/x
  listen: 127.0.0.1:6000
  superuser: {username: postgres, password: s3cret}
  replication: {password: r3plic}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.yml"
    p.write_text(text)
    return p


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, GOOD))
    assert cfg.etcd.hosts == ["http://127.0.0.1:2379"]
    assert cfg.postgresql.listen_host_port == ("127.0.0.1", 6000)
    assert cfg.prefix == "/hakeeper/demo"
    assert cfg.bootstrap.dcs.ttl == 5


def test_every_error_names_its_field(tmp_path: Path) -> None:
    bad = GOOD.replace("scope: demo", "scope: 'bad scope!'").replace(
        "listen: 127.0.0.1:6000", "listen: 127.0.0.1:notaport\n  tll: 3"
    )
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, bad))
    fields = dict(ei.value.errors)
    assert "scope" in fields
    assert "postgresql.listen" in fields
    assert fields["postgresql.tll"] == "unknown field"
    assert str(tmp_path / "node.yml") in str(ei.value)


def test_missing_required_and_managed_parameters(tmp_path: Path) -> None:
    text = "scope: s\npostgresql:\n  data_dir: /x\n  parameters: {port: 5, work_mem: 4MB}\n"
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, text))
    fields = dict(ei.value.errors)
    assert fields["name"] == "required field is missing"
    assert "port" in fields["postgresql.parameters"]


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAKEEPER_POSTGRESQL__DATA_DIR", "/srv/pg")
    monkeypatch.setenv("HAKEEPER_TAGS__NOFAILOVER", "true")
    cfg = load_node_config(write(tmp_path, GOOD))
    assert str(cfg.postgresql.data_dir) == "/srv/pg"
    assert cfg.tags.nofailover is True
    assert cfg.postgresql.listen == "127.0.0.1:6000"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, "scope: [unclosed\nname: x\n"))
    assert ei.value.errors[0][0].startswith("line ")


def test_secrets_are_masked_in_dumps(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, GOOD))
    assert "s3cret" not in cfg.model_dump_json()
    assert "s3cret" not in repr(cfg)


def test_fence_timing_must_fit_in_ttl() -> None:
    with pytest.raises(ValueError, match="must be below ttl"):
        DynamicConfig(ttl=2, keepalive_interval=1, fence_margin=1.5)


def test_default_fence_margin_covers_the_fencer_and_the_default_request_timeout(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, GOOD))
    assert cfg.bootstrap.dcs.fence_margin >= min_fence_margin(cfg.etcd.request_timeout)
    assert min_fence_margin(1.0) == FENCER_POLL + FENCER_KILL_GRACE + 1.0


def test_a_fence_margin_below_poll_grace_and_request_timeout_is_refused_at_its_field(tmp_path: Path) -> None:
    text = GOOD.replace("  hosts:", "  request_timeout: 2.0\n  hosts:")
    text += "bootstrap:\n  dcs:\n    fence_margin: 3.0\n"
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, text))
    (field, reason), *more = ei.value.errors
    assert not more and field == "bootstrap.dcs.fence_margin"
    assert "3.0 s is too small" in reason and "= 3.05 s" in reason and "etcd.request_timeout" in reason
    assert ei.value.source == str(tmp_path / "node.yml")
    ok = text.replace("fence_margin: 3.0", "fence_margin: 3.05")
    assert load_node_config(write(tmp_path, ok)).bootstrap.dcs.fence_margin == 3.05


def test_a_cluster_wide_fence_margin_must_cover_the_fencer() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_dynamic_config({"fence_margin": 1.0})
    assert ei.value.errors[0][0] == "fence_margin" and "1.0 s is too small" in ei.value.errors[0][1]
    assert parse_dynamic_config({"fence_margin": 1.25}).fence_margin == 1.25


def test_cli_validate_exits_2_with_file_and_field(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("name: node1", "name: node1\nbogus: 1"))
    r = subprocess.run(
        [sys.executable, "-m", "hakeeper", "config", "validate", "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{p}: bogus: unknown field" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "hakeeper", "config", "validate", "-c", str(write(tmp_path, GOOD))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


def test_cli_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "hakeeper", "agent", "-c", str(tmp_path / "nope.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "nope.yml: (file): No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_configuration_reference_is_current() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render(), (
        "regenerate: python -m hakeeper.core.config_docs > docs/configuration.md"
    )


def test_names_are_matched_whole_and_floats_must_be_finite(tmp_path: Path) -> None:
    """``re.match`` with ``$`` accepts a trailing newline; names are matched in full.  YAML's
    ``.inf`` is no value any setting can take."""
    bad = GOOD.replace("name: node1", 'name: "node1\\n"').replace(
        "superuser:", "parameters: {'bad name': 1}\n  superuser:"
    )
    bad += "bootstrap:\n  dcs: {switchover_timeout: .inf}\n"
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, bad))
    fields = dict(ei.value.errors)
    assert "name" in fields
    assert "not a PostgreSQL parameter name" in fields["postgresql.parameters"]
    assert "finite" in fields["bootstrap.dcs.switchover_timeout"]


def test_command_parameters_come_from_node_files_only(tmp_path: Path) -> None:
    """A node file is the node owner's; the cluster-wide config is whoever can write etcd."""
    node = GOOD.replace("superuser:", "parameters: {restore_command: 'cp /a %p'}\n  superuser:")
    assert load_node_config(write(tmp_path, node)).postgresql.parameters["restore_command"] == "cp /a %p"
    with pytest.raises(ValueError, match="runs a command or loads a library"):
        DynamicConfig.model_validate({"postgresql": {"parameters": {"Restore_Command": "x"}}})


NO_PASSWORDS = """
scope: demo
name: node1
postgresql:
  data_dir: /tmp/x
  listen: 0.0.0.0:6000
"""


def test_both_passwords_are_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without them pg_hba would have to trust TCP; a password generated on one node would be
    useless to the others, so the node refuses to start instead."""
    for key in ("HAKEEPER_POSTGRESQL__SUPERUSER__PASSWORD", "HAKEEPER_POSTGRESQL__REPLICATION__PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    p = write(tmp_path, NO_PASSWORDS)
    with pytest.raises(ConfigError) as ei:
        load_node_config(p)
    fields = dict(ei.value.errors)
    assert set(fields) == {"postgresql.superuser.password", "postgresql.replication.password"}
    text = str(ei.value)
    assert f"{p}: postgresql.superuser.password: required field is missing" in text
    assert "openssl rand" in text and "HAKEEPER_POSTGRESQL__REPLICATION__PASSWORD" in text
    # only one of the two missing: that one is named
    one = NO_PASSWORDS + "  superuser: {password: x}\n"
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, one))
    assert [f for f, _ in ei.value.errors] == ["postgresql.replication.password"]
    # the environment may supply them (the role names keep their defaults)
    monkeypatch.setenv("HAKEEPER_POSTGRESQL__SUPERUSER__PASSWORD", "from-env-su")
    monkeypatch.setenv("HAKEEPER_POSTGRESQL__REPLICATION__PASSWORD", "from-env-repl")
    cfg = load_node_config(write(tmp_path, NO_PASSWORDS))
    assert cfg.postgresql.superuser.username == "postgres"
    assert cfg.postgresql.replication.username == "replicator"
    assert cfg.postgresql.replication.password.get_secret_value() == "from-env-repl"


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("  superuser: {password: ''}\n  replication: {password: r}\n", "must not be empty"),
        ('  superuser: {password: "a\\nb"}\n  replication: {password: r}\n', "line break"),
    ],
)
def test_unusable_passwords_are_refused(tmp_path: Path, section: str, error: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, NO_PASSWORDS + section))
    assert error in dict(ei.value.errors)["postgresql.superuser.password"]


@pytest.mark.parametrize("cmd", [["config", "validate"], ["agent"]])
def test_cli_without_passwords_exits_2_naming_file_and_field(tmp_path: Path, cmd: list[str]) -> None:
    p = write(tmp_path, NO_PASSWORDS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    r = subprocess.run(
        [sys.executable, "-m", "hakeeper", *cmd, "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    assert f"{p}: postgresql.superuser.password: required field is missing" in r.stderr
    assert f"{p}: postgresql.replication.password: required field is missing" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_pg_hba_lines_may_not_trust_tcp(tmp_path: Path) -> None:
    text = GOOD + "  pg_hba:\n    - local all all trust\n    - host all all 10.0.0.0/8 trust\n"
    with pytest.raises(ConfigError) as ei:
        load_node_config(write(tmp_path, text))
    msg = dict(ei.value.errors)["postgresql.pg_hba"]
    assert "line 2" in msg and "trust" in msg
    ok = GOOD + "  pg_hba:\n    - local all all trust\n    - host all all 10.0.0.0/8 scram-sha-256\n"
    assert len(load_node_config(write(tmp_path, ok)).postgresql.pg_hba) == 2


def test_a_node_file_may_add_socket_directories(tmp_path: Path) -> None:
    """Issue 13: the node file's unix_socket_directories are honoured (added after the
    agent's own private directory); they must be absolute, and etcd may not set them."""
    text = GOOD.replace(
        "superuser:", "parameters: {unix_socket_directories: '/var/run/postgresql, /tmp'}\n  superuser:"
    )
    cfg = load_node_config(write(tmp_path, text))
    assert cfg.postgresql.socket_dirs == ["/var/run/postgresql", "/tmp"]
    assert load_node_config(write(tmp_path, GOOD)).postgresql.socket_dirs == []
    for bad in ("run/postgresql", "'\"/a b\"'", "7"):
        text = GOOD.replace("superuser:", f"parameters: {{unix_socket_directories: {bad}}}\n  superuser:")
        with pytest.raises(ConfigError) as ei:
            load_node_config(write(tmp_path, text))
        assert "unix_socket_directories" in dict(ei.value.errors)["postgresql.parameters"], bad
    with pytest.raises(ConfigError) as ei:
        parse_dynamic_config({"postgresql": {"parameters": {"unix_socket_directories": "/tmp"}}})
    assert "unix_socket_directories" in dict(ei.value.errors)["postgresql.parameters"]
