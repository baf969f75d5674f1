"""Fixtures shared by the integration test modules."""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hakeeper.localcluster import LocalClusterError, pgbuilds
from tests.support.pg import PgArea
from tests.support.s3_server import seaweed  # noqa: F401  (a module-scoped SeaweedFS)


@pytest.fixture
async def area() -> AsyncIterator[PgArea]:
    """A directory of PostgreSQL data dirs and node configs; every server in it stopped after."""
    a = PgArea()
    try:
        yield a
    finally:
        a.cleanup()


_HERE = Path(__file__).parent


def pytest_report_header(config: pytest.Config) -> str:
    """Which PostgreSQL major this session's clusters and servers run: `make integration` runs
    the suite on 15 and the ``matrix`` subset on 17 and 18, and its log must say which is which."""
    try:
        major = pgbuilds.default_major()
        where = str(pgbuilds.bin_dir(major))
    except LocalClusterError as e:
        return f"PostgreSQL: not usable ({e})"
    source = f"{pgbuilds.ENV_VAR}" if pgbuilds.ENV_VAR in os.environ else "the default"
    return f"PostgreSQL {major} (from {source}): {where}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail the run when a test under tests/integration lacks the ``integration`` marker.

    ``make integration`` selects ``-m integration``: an unmarked test (a new module that forgot
    ``pytestmark``) would be deselected without a word and never run in CI.  tryfirst: this
    must see the items before ``-m`` deselects them."""
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(_HERE) and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "integration tests without the `integration` marker (add "
            "`pytestmark = pytest.mark.integration` to the module): " + ", ".join(unmarked)
        )
