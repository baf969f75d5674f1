"""Fixtures shared by the integration test modules."""

from collections.abc import AsyncIterator

import pytest

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
