"""Loading a node file keeps the promise of the CLI: every mistake is a `file: field: message`
line (or the variable's name), exit 2, never a traceback, and every error of a file at once.

The cases run the real CLI in a subprocess (`config validate`, `list`), so the exit code and the
absence of a traceback are what a user sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hakeeper.core.config import ConfigError, load_node_config

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
scope: s
name: n1
postgresql:
  data_dir: /var/lib/postgresql/15/main
  superuser: {password: su-secret}
  replication: {password: repl-secret}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=60,
        check=False,
    )


def _validate(path: Path, **env: str) -> tuple[int, list[str]]:
    res = _cli("config", "validate", "-c", str(path), **env)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    return res.returncode, res.stderr.splitlines()


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HAKEEPER_"):
            monkeypatch.delenv(key)


def _write(tmp_path: Path, text: str | bytes, name: str = "node.yml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_a_good_file_is_ok(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    res = _cli("config", "validate", "-c", str(p))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_non_json_environment_override_names_the_variable(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    code, lines = _validate(p, HAKEEPER_ETCD__HOSTS="http://10.0.0.1:2379")
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{p}: env HAKEEPER_ETCD__HOSTS: not valid JSON (etcd.hosts"), lines


def test_non_json_override_of_a_section_too(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    code, lines = _validate(p, HAKEEPER_TAGS="nofailover")
    assert code == 2 and lines and "env HAKEEPER_TAGS: not valid JSON (tags" in lines[0], lines


def test_a_valid_json_override_still_applies(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    res = _cli("config", "validate", "-c", str(p), HAKEEPER_ETCD__HOSTS='["http://10.0.0.1:2379"]')
    assert res.returncode == 0, res.stderr


def test_non_utf8_file(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.encode() + b"# caf\xe9\n")
    code, lines = _validate(p)
    offset = len(GOOD.encode()) + len(b"# caf")
    assert code == 2
    assert lines == [f"{p}: line 7: not UTF-8 (byte 0xe9 at offset {offset})"], lines


@pytest.mark.parametrize(
    ("extra", "field", "lines"),
    [
        ("postgresql:\n  data_dir: /x\n", "postgresql", "3 and 7"),  # drops the passwords
        ("tags:\n  nofailover: true\n  nofailover: false\n", "tags.nofailover", "8 and 9"),
    ],
)
def test_duplicate_key_names_key_and_both_lines(tmp_path: Path, extra: str, field: str, lines: str) -> None:
    p = _write(tmp_path, GOOD + extra)
    code, out = _validate(p)
    key = field.rsplit(".", 1)[-1]
    assert code == 2
    assert out == [
        f"{p}: {field}: duplicate key {key!r} at lines {lines} (YAML would keep only the last one, silently)"
    ]


def test_duplicate_key_inside_a_list_item(tmp_path: Path) -> None:
    text = GOOD + "backup:\n  repositories:\n    - name: a\n      type: fs\n      name: b\n"
    code, out = _validate(_write(tmp_path, text))
    assert code == 2 and len(out) == 1 and ": backup.repositories.0.name: duplicate key 'name'" in out[0]


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        ("relative/dir", {}, "'relative/dir' must be an absolute path"),
        ("/var/lib/x", {"HAKEEPER_POSTGRESQL__DATA_DIR": ""}, "must not be empty"),
        ("/var/lib/x", {"HAKEEPER_POSTGRESQL__DATA_DIR": "data"}, "'data' must be an absolute path"),
    ],
)
def test_empty_or_relative_data_dir(tmp_path: Path, value: str, env: dict[str, str], message: str) -> None:
    p = _write(tmp_path, GOOD.replace("/var/lib/postgresql/15/main", value))
    code, out = _validate(p, **env)
    assert code == 2
    assert any(line.startswith(f"{p}: postgresql.data_dir: {message}") for line in out), out


def test_bad_etcd_urls_each_named(tmp_path: Path) -> None:
    hosts = ["http://", "http://h:99999", "127.0.0.1:notaport", "http://a b:2379", "e1:2379,e2:2379"]
    hosts += ["ftp://e1:2379", "https://e3:2379"]
    p = _write(tmp_path, GOOD + "etcd:\n  hosts:\n" + "".join(f"    - {h!r}\n" for h in hosts))
    code, out = _validate(p)
    assert code == 2
    assert [line.split(": ")[1] for line in out] == [f"etcd.hosts.{i}" for i in range(6)], out
    assert "names no host" in out[0] and "invalid port" in out[1] and "invalid port" in out[2]
    assert "spaces" in out[3] and "joined by commas" in out[4] and "http:// or https://" in out[5]


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:2379", "http://127.0.0.1:99999", "http://"])
def test_list_with_a_bad_etcd_url(url: str) -> None:
    res = _cli("list", "--etcd", url, "--scope", "s")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(f"--etcd {url}: "), res.stderr


def test_every_error_of_a_file_in_one_pass(tmp_path: Path) -> None:
    """Field errors and the cross-field checks (managed parameters, repeated repository names,
    a schedule's unknown repository) together, not in waves."""
    text = GOOD.replace("  superuser", "  parameters: {shared_buffers: [1GB], port: 5433}\n  superuser")
    text += """\
tags: {failover_priority: high}
backup:
  repositories:
    - {name: r1, type: fs, path: relative}
    - {name: r1, type: fs, path: /srv/backups}
  schedules:
    - {name: s1, kind: full, cron: "0 1 * * 0", repositories: [r9]}
"""
    p = _write(tmp_path, text)
    code, out = _validate(p)
    assert code == 2
    got = {line.removeprefix(f"{p}: ") for line in out}
    assert got == {
        "postgresql.parameters.shared_buffers: must be a string, number or boolean, not a list",
        "postgresql.parameters: managed by hakeeper, set them elsewhere: port",
        "tags.failover_priority: Input should be a valid integer, unable to parse string as an integer",
        "backup.repositories.0: path 'relative' must be absolute",
        "backup: repository names must be unique; repeated: r1",
        "backup: schedules.0.repositories: unknown repository r9",
    }, out


def test_no_value_error_prefix(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("name: n1", "name: db/1"))
    code, out = _validate(p)
    assert code == 2 and out == [f"{p}: name: use 1-63 letters, digits, '_', '-' or '.'"], out


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("su-secret", "CHANGE-ME-superuser-password", "postgresql.superuser.password"),
        ("repl-secret", "changeme", "postgresql.replication.password"),
        ("scope: s", "scope: s\napi: {username: u, password: change-me}", "api.password"),
        ("scope: s", "scope: s\napi: {token: CHANGEME}", "api.token"),
        ("scope: s", "scope: s\netcd: {username: u, password: Change_Me_etcd}", "etcd.password"),
    ],
)
def test_placeholder_passwords_are_refused(tmp_path: Path, old: str, new: str, field: str) -> None:
    code, out = _validate(_write(tmp_path, GOOD.replace(old, new)))
    assert code == 2
    assert any(f": {field}: still the example's placeholder" in line for line in out), out


def test_a_password_merely_containing_change_me_is_fine(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD.replace("su-secret", "x-change-me-not"))
    load_node_config(p)


def test_load_node_config_raises_config_error_not_settings_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAKEEPER_API__ALLOWLIST", "10.0.0.0/8")
    with pytest.raises(ConfigError) as info:
        load_node_config(_write(tmp_path, GOOD))
    assert info.value.errors[0][0] == "env HAKEEPER_API__ALLOWLIST"
