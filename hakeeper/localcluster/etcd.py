"""The etcd of a local cluster: one member on loopback, started and stopped by PID.

Secure by default (:class:`EtcdSecurity`): etcd serves only HTTPS, demands a client certificate
signed by the cluster's own CA (``--client-cert-auth``), and has authentication enabled with a
``root`` user (password in ``etcd/root.password``, used only here to set users up) and a
``hakeeper`` user whose role may read and write the cluster's key prefix and nothing else.

Why user and password on top of the certificate: hakeeper talks to etcd's JSON gateway, and etcd
does not take the user from a certificate's CN for gateway requests (it even answers 400 to a
gateway request whose client certificate has a CN, so the client certificate has none).  The
certificate keeps everyone without one from even opening a connection; the password names the
user whose role limits what the connection may touch."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hakeeper.localcluster.certs import TlsFiles, ensure_certificates
from hakeeper.localcluster.layout import HOST, LocalClusterError
from hakeeper.localcluster.procs import etcd_program, send_signal, tail_file
from hakeeper.util.proc import proc_cmdline

__all__ = ["EtcdSecurity", "EtcdService", "LocalEtcd", "etcd_argv"]

ETCD_USER = "hakeeper"  # the agents' and the CLI's etcd user (and role)


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """TLS and authentication of a local etcd: the CA's files, the key prefix the ``hakeeper``
    role may use, and the two users' passwords (``root`` only sets up users and roles)."""

    tls: TlsFiles
    prefix: str  # e.g. "/hakeeper/demo": the role gets [prefix + "/", prefix + "0")
    password: str = ""
    root_password: str = ""

    def __repr__(self) -> str:  # never show passwords
        return f"EtcdSecurity(tls={self.tls.directory}, prefix={self.prefix!r})"

    def tls_argv(self) -> list[str]:
        t = self.tls
        return [
            "--cert-file",
            str(t.server_cert),
            "--key-file",
            str(t.server_key),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(t.ca_cert),
            # Every CLI call logs in once, and etcd checks the password with bcrypt: at the
            # default cost (10) that is ~75 ms of etcd CPU per call, at 4 well under 1 ms.  Our
            # passwords are 24 random bytes (192 bits), out of reach of any guessing however
            # cheap the hash, and the hashes stay in etcd's 0700 data directory.
            "--bcrypt-cost",
            "4",
        ]

    def ssl_context(self) -> ssl.SSLContext:
        """What a client of this etcd uses: our CA, our client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx


def read_secret(path: Path) -> str | None:
    """The secret kept in ``path``, None when there is none."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_secret(path: Path, value: str) -> None:
    """Keep ``value`` in ``path``, mode 0600 from the start (unchanged when already there)."""
    if read_secret(path) == value:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def etcd_argv(
    name: str,
    data_dir: Path,
    client_url: str,
    peer_url: str,
    initial_cluster: str,
    token: str,
    security: EtcdSecurity | None = None,
) -> list[str]:
    """Command line of one etcd member tuned for a cluster on one machine (fast elections,
    compaction by revision so that watches see compaction like in production); with
    ``security``, clients must come over TLS with a certificate of the cluster's CA."""
    tls = security.tls_argv() if security is not None else []
    return [
        etcd_program(),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        token,
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "1000",
        "--logger",
        "zap",
        "--log-level",
        "warn",
        *tls,
    ]


class EtcdService(Protocol):
    """What a local cluster needs from its etcd, whether one member (:class:`LocalEtcd`) or
    several (the chaos harness)."""

    @property
    def url(self) -> str:
        """The client URL the agents and tools use."""

    @property
    def pid(self) -> int | None:
        """A running member's PID (None when none runs)."""

    def start(self, timeout: float = 30.0) -> int:
        """Start and wait until healthy; a member's PID."""

    def stop(self, timeout: float = 15.0) -> None: ...

    def leftover_pids(self) -> list[int]:
        """etcd processes of an earlier run on our data that we did not start."""


class LocalEtcd:
    """The single etcd member of a local cluster, with its data and log under ``etcd_dir``."""

    def __init__(
        self,
        *,
        etcd_dir: Path,
        data_dir: Path,
        log_path: Path,
        client_port: int,
        peer_port: int,
        token: str,
        security: EtcdSecurity | None = None,
    ) -> None:
        self.etcd_dir = etcd_dir
        self.data_dir = data_dir
        self.log_path = log_path
        self.security = security
        scheme = "https" if security is not None else "http"
        self.url = f"{scheme}://{HOST}:{client_port}"
        # Peers: one member, on loopback, nobody else ever joins; its traffic stays plain.
        self.peer_url = f"http://{HOST}:{peer_port}"
        self.token = token
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> int:
        """Start the single etcd member and wait until it is healthy; returns its PID."""
        if self.pid is not None:
            return self.pid
        self.etcd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.security is not None:
            ensure_certificates(self.security.tls)
        argv = etcd_argv(
            "etcd1",
            self.data_dir,
            self.url,
            self.peer_url,
            f"etcd1={self.peer_url}",
            self.token,
            self.security,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.etcd_dir,
                start_new_session=True,
            )
        try:
            self._wait_healthy(timeout)
            if self.security is not None:
                self._set_up_auth(self.security)
        except BaseException:
            self.stop()
            raise
        return self._proc.pid

    # ------------------------------------------------------------------ authentication

    def _post(self, sec: EtcdSecurity, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        """One JSON gateway call; raises :class:`LocalClusterError` with etcd's message."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = token
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5, context=sec.ssl_context()) as r:
                data = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                text = str(json.loads(text).get("message") or text)
            except (ValueError, AttributeError):
                pass
            raise LocalClusterError(f"etcd {path}: {text.strip()}") from None
        except (OSError, ValueError) as e:
            raise LocalClusterError(f"etcd {path}: {e}") from None
        return data if isinstance(data, dict) else {}

    def _set_up_auth(self, sec: EtcdSecurity) -> None:
        """Users, role and permission, then authentication on.  Idempotent: on a restart (auth
        already enabled) the same steps run again as ``root`` and only bring passwords and the
        permission up to date."""
        token: str | None = None
        try:
            token = str(
                self._post(
                    sec, "/v3/auth/authenticate", {"name": "root", "password": sec.root_password}, None
                )["token"]
            )
        except LocalClusterError as e:
            if "not enabled" not in str(e):
                raise LocalClusterError(
                    f"etcd under {self.etcd_dir} has authentication enabled but refuses our root "
                    f"password ({e}); start over with a fresh directory"
                ) from None
        except KeyError:
            raise LocalClusterError("etcd /v3/auth/authenticate returned no token") from None

        def call(path: str, body: dict[str, Any], exists: str | None = None) -> None:
            try:
                self._post(sec, path, body, token)
            except LocalClusterError as e:
                if exists is None or exists not in str(e):
                    raise

        call("/v3/auth/user/add", {"name": "root", "password": sec.root_password}, "already exists")
        call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        call("/v3/auth/role/add", {"name": ETCD_USER}, "already exists")
        perm = {"permType": "READWRITE", "key": _b64(sec.prefix + "/"), "range_end": _b64(sec.prefix + "0")}
        call("/v3/auth/role/grant", {"name": ETCD_USER, "perm": perm})
        call("/v3/auth/user/add", {"name": ETCD_USER, "password": sec.password}, "already exists")
        call("/v3/auth/user/changepw", {"name": ETCD_USER, "password": sec.password})
        call("/v3/auth/user/grant", {"user": ETCD_USER, "role": ETCD_USER})
        if token is None:
            call("/v3/auth/enable", {})

    # ------------------------------------------------------------------ health

    def _health(self) -> bytes:
        ctx = self.security.ssl_context() if self.security is not None else None
        with urllib.request.urlopen(self.url + "/health", timeout=1, context=ctx) as r:
            body: bytes = r.read()
        return body

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LocalClusterError(
                    f"etcd exited ({code}); see {self.log_path}:\n{tail_file(self.log_path)}"
                )
            try:
                body = self._health()
                if b'"true"' in body:
                    return
                last = body.decode(errors="replace")
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise LocalClusterError(f"etcd not healthy after {timeout:.0f}s ({last}); see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            send_signal(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """etcd processes serving our etcd data directory that we did not start."""
        ours = self.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == ours:
                continue
            args = proc_cmdline(int(entry))
            if not args or Path(args[0]).name != "etcd":
                continue
            for i, a in enumerate(args[:-1]):
                if a in ("--data-dir", "-data-dir") and Path(args[i + 1]).absolute() == self.data_dir:
                    found.append(int(entry))
        return found
