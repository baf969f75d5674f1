"""A real etcd server process for tests: start, stop, kill -9, SIGSTOP, restart (by PID)."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_ports

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
OPENSSL_BIN = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA plus a server and a client certificate, for 127.0.0.1 (see ``make_tls``)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """Create a self-signed CA and server/client certificates with ``openssl`` (EC keys: fast)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([OPENSSL_BIN, *args], check=True, capture_output=True, timeout=60)

    def key(name: str) -> Path:
        path = d / f"{name}.key"
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        return path

    ca_key = key("ca")
    ca = d / "ca.crt"
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=hakeeper-test-ca",
    )
    out: dict[str, Path] = {}
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        k = key(name)
        csr = d / f"{name}.csr"
        crt = d / f"{name}.crt"
        extfile = d / f"{name}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-new", "-key", str(k), "-out", str(csr), "-subj", f"/CN={name}")
        run(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(crt),
            "-days",
            "2",
            "-extfile",
            str(extfile),
        )
        out[name + "_cert"], out[name + "_key"] = crt, k
    return TlsFiles(ca=ca, **out)


class EtcdServer:
    def __init__(
        self,
        data_dir: Path,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "etcd0",
        *,
        tls: TlsFiles | None = None,
        initial_cluster: str | None = None,
    ) -> None:
        if client_port is None or peer_port is None:
            client_port, peer_port = free_ports(2)
        self.data_dir = Path(data_dir)
        self.client_port = client_port
        self.peer_port = peer_port
        self.name = name
        self.tls = tls
        self.initial_cluster = initial_cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{name}.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        peer = self.peer_url
        argv = [
            ETCD_BIN,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "1000",
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        if self.tls:
            argv += [
                "--cert-file",
                str(self.tls.server_cert),
                "--key-file",
                str(self.tls.server_key),
                "--trusted-ca-file",
                str(self.tls.ca),
                "--client-cert-auth",
            ]
        return argv

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def start(self, timeout: float = 20.0, wait: bool = True) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env["ETCD_UNSUPPORTED_ARCH"] = os.environ.get("ETCD_UNSUPPORTED_ARCH", "")
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(
                    self.url + "/health", timeout=1, context=self._ssl_context()
                ) as r:
                    if b'"true"' in r.read():
                        return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {timeout}s: {last}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def sigstop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


class EtcdCluster:
    """Three (or ``size``) etcd members on loopback, started together."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        self.members = [
            EtcdServer(Path(base_dir) / f"etcd{i}" / "data", ports[2 * i], ports[2 * i + 1], name=f"etcd{i}")
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        try:
            for m in self.members:
                m.start(wait=False)
            for m in self.members:
                m.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for m in self.members:
            m.stop()
