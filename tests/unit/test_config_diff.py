"""What a reload may change: every node-file field has a decision, a change that needs a
restart is found and explained, and no secret value is ever rendered."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from hakeeper.core.config import NodeConfig, load_node_config
from hakeeper.core.config_diff import POLICY, Rule, diff, render, unclassified

BASE = """
scope: demo
name: node1
postgresql:
  data_dir: /tmp/x
  listen: 127.0.0.1:6000
  superuser: {username: postgres, password: su-secret-value}
  replication: {password: repl-secret-value}
  parameters: {work_mem: 4MB}
api:
  token: token-secret-value
"""


def load(tmp_path: Path, extra: str = "", base: str = BASE) -> NodeConfig:
    p = tmp_path / "node.yml"
    p.write_text(base + extra)
    return load_node_config(p)


def test_every_field_of_the_node_file_has_a_decision() -> None:
    assert list(unclassified()) == []


def test_every_decision_names_a_field_that_exists() -> None:
    def exists(path: str) -> bool:
        model: type[BaseModel] = NodeConfig
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part not in model.model_fields:
                return False
            if i < len(parts) - 1:
                ann = model.model_fields[part].annotation
                assert isinstance(ann, type) and issubclass(ann, BaseModel), path
                model = ann
        return True

    assert [p for p in POLICY if not exists(p)] == []


def test_a_new_field_without_a_decision_is_found() -> None:
    class Extra(BaseModel):
        brand_new: int = Field(0)

    class WithExtra(NodeConfig):
        extra: Extra = Field(default_factory=Extra)

    assert list(unclassified(WithExtra)) == ["extra.brand_new"]


def test_what_must_stay_is_classified_restart() -> None:
    for path in (
        "scope",
        "name",
        "namespace",
        "postgresql.data_dir",
        "postgresql.listen",
        "postgresql.bin_dir",
        "api.listen",
        "etcd.hosts",
    ):
        assert POLICY[path].rule == Rule.RESTART, path
    for path in ("tags.nofailover", "postgresql.parameters", "postgresql.pg_hba", "log.level", "api.token"):
        assert POLICY[path].rule == Rule.RUNTIME, path


def test_no_change(tmp_path: Path) -> None:
    d = diff(load(tmp_path), load(tmp_path))
    assert d.changes == ()
    assert d.summary() == "no change"


def test_runtime_changes_are_listed_old_to_new(tmp_path: Path) -> None:
    old = load(tmp_path)
    new = load(tmp_path, "tags: {nofailover: true}\nlog: {level: DEBUG}\n").model_copy()
    new.postgresql.parameters = {"work_mem": "8MB", "max_connections": 200}
    d = diff(old, new)
    assert d.refused == ()
    assert d.summary() == (
        "postgresql.parameters.max_connections (unset) -> 200; postgresql.parameters.work_mem 4MB -> 8MB; "
        "tags.nofailover false -> true; log.level INFO -> DEBUG"
    )
    assert d.touches("tags") and d.touches("postgresql.parameters") and not d.touches("backup")


def test_a_change_that_needs_a_restart_is_refused_with_its_reason(tmp_path: Path) -> None:
    old = load(tmp_path)
    new = load(tmp_path, "tags: {nofailover: true}\n", base=BASE.replace("scope: demo", "scope: other"))
    d = diff(old, new)
    assert [c.field for c in d.refused] == ["scope"]
    assert "scope cannot change at run time: the cluster this agent belongs to" in d.refusal()
    assert "tags.nofailover" in d.fields  # listed, but the caller applies nothing (all or nothing)


def test_secrets_are_never_rendered(tmp_path: Path) -> None:
    old = load(tmp_path)
    changed = (
        BASE.replace("token-secret-value", "token-other-value")
        .replace("su-secret-value", "su-other-value")
        .replace("repl-secret-value", "repl-other-value")
    )
    new = load(tmp_path, base=changed)
    d = diff(old, new)
    text = d.summary() + d.refusal()
    assert set(d.fields) == {"api.token", "postgresql.superuser", "postgresql.replication"}
    assert "api.token changed" in d.summary()
    for secret in ("secret-value", "other-value"):
        assert secret not in text
    assert render(old.api.token) == "(secret)"
    assert render(old.postgresql.superuser) == "(secret)"


def test_a_secret_set_for_the_first_time_says_so_without_its_value(tmp_path: Path) -> None:
    old = load(tmp_path)
    new = load(tmp_path, "  username: admin\n  password: pw-secret-value\n")  # under api:
    d = diff(old, new)
    assert d.summary() == "api.username (unset) -> admin; api.password (unset) -> (secret)"
    assert "pw-secret-value" not in d.summary()
