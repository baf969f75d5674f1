"""Fixtures shared by the integration test modules."""

from tests.support.s3_server import seaweed  # noqa: F401  (a module-scoped SeaweedFS)
