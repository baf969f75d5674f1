"""docs/configuration.md is generated in full: what the code refuses or accepts is what the
reference lists (issue 13, item 15; review A3 K3, K4, K7)."""

from __future__ import annotations

from pydantic import BaseModel

from hakeeper.core.backup_config import RepositoryConfig, ScheduleConfig
from hakeeper.core.config import AGENT_OWNED_PARAMETERS, COMMAND_PARAMETERS, PostgresTls
from hakeeper.core.config_docs import render


def _section(doc: str, start: str) -> str:
    return doc[doc.index(start) :].split("\n\n", 1)[0]


def test_managed_and_command_parameters_come_from_the_code() -> None:
    doc = render()
    managed = _section(doc, "Managed by hakeeper and refused")
    assert "synchronous_standby_names" in AGENT_OWNED_PARAMETERS
    for name in AGENT_OWNED_PARAMETERS:
        assert f"`{name}`" in managed, name
    command = _section(doc, "Refused in the dynamic settings")
    for name in COMMAND_PARAMETERS:
        assert f"`{name}`" in command, name


def _keys(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_key_of_a_repository_and_a_schedule_entry_has_a_row() -> None:
    doc = render()
    for key in _keys(RepositoryConfig):
        assert f"| `backup.repositories[].{key}` |" in doc, key
    for key in ("endpoint", "bucket", "access_key", "secret_key", "ca_file", "verify_tls"):
        assert f"`backup.repositories[].{key}`" in doc  # the S3 keys, by name
    assert "| `backup.repositories[].retention.full_count` |" in doc
    assert "| `backup.repositories[].encryption.key_file` |" in doc
    for key in _keys(ScheduleConfig):
        assert f"| `backup.schedules[].{key}` |" in doc, key
    for key in _keys(PostgresTls):
        assert f"| `postgresql.tls.{key}` |" in doc, key


def test_types_read_as_values_and_no_row_has_an_empty_meaning() -> None:
    doc = render()
    assert '| `backup.repositories[].type` | `"fs"` or `"s3"` |' in doc
    assert "Literal" not in doc and "Union" not in doc and "hakeeper.core.backup_config" not in doc
    rows = [line for line in doc.splitlines() if line.startswith("| `") and line.count("|") == 5]
    assert len(rows) > 150
    empty = [r for r in rows if r.rstrip().endswith("|  |") and "| section |" not in r]
    assert empty == [], empty
