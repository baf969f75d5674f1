"""A real S3 server for tests: SeaweedFS ``weed mini`` (see :mod:`hakeeper.util.s3local`, which the
demo uses too) on free loopback ports, with a boto3 client for set-up and tampering."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.util.s3local import COMPONENTS, LocalS3
from tests.support.ports import free_ports

ACCESS_KEY = "hakeeper-test"
SECRET_KEY = "hakeeper-test-secret-0123456789"


def _free_port_pairs() -> dict[str, tuple[int, int]]:
    """An HTTP and a gRPC port for each component, all free."""
    ports = free_ports(2 * len(COMPONENTS))
    return {c: (ports[2 * i], ports[2 * i + 1]) for i, c in enumerate(COMPONENTS)}


class SeaweedS3(LocalS3):
    """:class:`hakeeper.util.s3local.LocalS3` on free ports with the test credentials."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir, _free_port_pairs(), ACCESS_KEY, SECRET_KEY)

    def client(self) -> object:
        """A synchronous boto3 S3 client (for set-up and for tampering with objects)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=1,
                read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    def wait_ready(self, timeout: float) -> None:
        """Until the S3 gateway answers an authenticated request (list_buckets)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see {self.log_path}")
            try:
                client.list_buckets()  # type: ignore[attr-defined]
                return
            except Exception as e:  # not up yet: connection refused, 5xx while the filer starts
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}; see {self.log_path}")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS per test module (tests/integration/conftest.py provides it), always stopped."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_repository_config(
    endpoint: str, bucket: str, name: str = "seaweed", prefix: str = "cluster1"
) -> RepositoryConfig:
    """A RepositoryConfig of ``bucket`` on this test server (timeouts short: a test waits)."""
    return RepositoryConfig.model_validate(
        {
            "name": name,
            "type": "s3",
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "timeout": 10,
        }
    )
