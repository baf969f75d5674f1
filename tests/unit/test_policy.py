"""The 3-2-1 rule as a truth table (hakeeper.backup.policy.evaluate)."""

from __future__ import annotations

import datetime as dt

import pytest

from hakeeper.backup.policy import Item, RepoFacts, Rule, evaluate
from hakeeper.core.backup_config import RepositoryConfig

REPOS = {
    "local": RepoFacts("local", "disk", False),
    "nas": RepoFacts("nas", "disk", False),
    "cloud": RepoFacts("cloud", "object", True),
    "cloud2": RepoFacts("cloud2", "object", True),
}
T = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("holders", "ok", "missing"),
    [
        (("local", "nas", "cloud"), True, []),
        (("local", "cloud", "cloud2"), True, []),
        (("local", "nas"), False, ["2 of 3 copies", "1 of 2 storage types (disk)", "0 of 1 off-site copies"]),
        (("cloud", "cloud2"), False, ["2 of 3 copies", "1 of 2 storage types (object)"]),
        (
            ("local", "nas", "nas"),
            False,
            ["2 of 3 copies", "1 of 2 storage types (disk)", "0 of 1 off-site copies"],
        ),
        (
            ("local", "gone", "cloud"),
            False,
            ["2 of 3 copies"],
        ),  # an unconfigured repository counts for nothing
        ((), False, ["0 of 3 copies", "0 of 2 storage types (none)", "0 of 1 off-site copies"]),
    ],
)
def test_three_copies_two_storage_types_one_offsite(
    holders: tuple[str, ...], ok: bool, missing: list[str]
) -> None:
    (row,) = evaluate([Item("b1", "backup", T, holders)], REPOS, Rule())
    assert (row.ok, row.missing) == (ok, missing)


def test_rows_newest_first_and_a_looser_rule() -> None:
    items = [
        Item("old", "backup", T, ("local",)),
        Item("D1", "dump", T + dt.timedelta(days=1), ("local", "cloud")),
    ]
    rows = evaluate(items, REPOS, Rule(copies=2, storage_types=2, offsite=1))
    assert [(r.id, r.ok) for r in rows] == [("D1", True), ("old", False)]


def test_storage_type_defaults_from_the_repository_type() -> None:
    fs = RepositoryConfig.model_validate({"name": "a", "type": "fs", "path": "/r"})
    s3 = RepositoryConfig.model_validate({"name": "b", "type": "s3", "bucket": "x", "offsite": True})
    nfs = RepositoryConfig.model_validate({"name": "c", "type": "fs", "path": "/n", "storage": "nfs"})
    assert [RepoFacts.of(r) for r in (fs, s3, nfs)] == [
        RepoFacts("a", "disk", False),
        RepoFacts("b", "object", True),
        RepoFacts("c", "nfs", False),
    ]
    with pytest.raises(ValueError, match="storage"):
        RepositoryConfig.model_validate({"name": "d", "type": "fs", "path": "/n", "storage": "Bad Label"})
