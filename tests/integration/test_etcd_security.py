"""Issue 12, finding 3: the local cluster's etcd (what `hakeeper demo` runs) accepts only TLS
clients with a certificate of the cluster's CA and an etcd user, the ``hakeeper`` user reaches
only its cluster's keys, and the CLI sends API requests (with the operator's credentials) only
to member URLs it can trust without etcd."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from hakeeper.localcluster import LocalCluster
from tests.support.cluster import etcd_gateway, running_cluster
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

ALL_KEYS = {"key": "Lw==", "range_end": "MA=="}  # "/" .. "0": every key under "/"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster(nodes=1) as c:
        yield c


def _range(c: LocalCluster, ctx: ssl.SSLContext | None, token: str | None, url: str | None = None) -> Any:
    headers = {"Authorization": token} if token else {}
    req = urllib.request.Request(
        (url or c.etcd.url) + "/v3/kv/range", data=json.dumps(ALL_KEYS).encode(), headers=headers
    )
    with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
        return json.loads(r.read())


def test_files_and_urls(cluster: LocalCluster) -> None:
    sec = cluster.etcd_security
    assert sec is not None
    assert cluster.etcd.url.startswith("https://127.0.0.1:")
    for key in (sec.tls.client_key, sec.tls.server_key, cluster.etcd_root_password_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(sec.tls.directory.stat().st_mode) == 0o700
    assert not any("ca.key" in p.name for p in sec.tls.directory.iterdir()), "the CA key is never kept"


def test_plain_http_gets_no_keys(cluster: LocalCluster) -> None:
    with pytest.raises(OSError):  # a TLS port answering plain HTTP: the connection is dropped
        _range(cluster, None, None, url=cluster.etcd.url.replace("https:", "http:"))


def test_https_without_client_certificate_fails_the_handshake(cluster: LocalCluster) -> None:
    assert cluster.etcd_security is not None
    no_cert = ssl.create_default_context(cafile=str(cluster.etcd_security.tls.ca_cert))
    # With TLS 1.3 the server's refusal may arrive after the handshake returned on our side:
    # then the alert surfaces on the first read, as an SSLError of its own.
    with pytest.raises((urllib.error.URLError, ssl.SSLError)) as exc:
        _range(cluster, no_cert, None)
    err = exc.value
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    assert isinstance(reason, ssl.SSLError), err


def test_client_certificate_without_credentials_gets_no_keys(cluster: LocalCluster) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        etcd_gateway(cluster, "/v3/kv/range", ALL_KEYS, user=None)
    assert exc.value.code == 403
    assert "permission denied" in exc.value.read().decode()


def test_wrong_password_is_refused(cluster: LocalCluster) -> None:
    assert cluster.etcd_security is not None
    with pytest.raises(urllib.error.HTTPError) as exc:
        req = urllib.request.Request(
            cluster.etcd.url + "/v3/auth/authenticate",
            data=json.dumps({"name": "hakeeper", "password": "not-it"}).encode(),
        )
        urllib.request.urlopen(req, timeout=5, context=cluster.etcd_security.ssl_context())
    assert exc.value.code in (400, 401)


def test_hakeeper_user_reaches_only_its_cluster_prefix(cluster: LocalCluster) -> None:
    prefix = f"/hakeeper/{cluster.scope}/"
    # The new primary publishes its member record right after bootstrap (not a loop_wait of 10 s
    # later: a CI run once read the keys in that gap); 5 s is ample for one more HA cycle.
    deadline = time.monotonic() + 5
    while True:
        body = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")}
        mine = etcd_gateway(cluster, "/v3/kv/range", body)
        keys = {_unb64(kv["key"]) for kv in mine["kvs"]}
        if f"{prefix}members/node1" in keys or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert f"{prefix}leader" in keys and f"{prefix}members/node1" in keys
    for body in (
        ALL_KEYS,  # everything
        {"key": _b64("/hakeeper/other/leader")},  # another cluster under the same namespace
    ):
        with pytest.raises(urllib.error.HTTPError) as exc:
            etcd_gateway(cluster, "/v3/kv/range", body)
        assert exc.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as exc:
        etcd_gateway(cluster, "/v3/kv/put", {"key": _b64("/elsewhere"), "value": _b64("x")})
    assert exc.value.code == 403
    # root sees everything (it set the users up); the sample proves the keys exist.
    assert etcd_gateway(cluster, "/v3/kv/range", ALL_KEYS, user="root")["kvs"]


def test_no_etcd_password_in_logs(cluster: LocalCluster) -> None:
    sec = cluster.etcd_security
    assert sec is not None
    texts = [cluster.etcd_log.read_text(), *(n.log_path.read_text() for n in cluster.nodes.values())]
    for text in texts:
        assert sec.password not in text and sec.root_password not in text


def test_cli_over_tls_with_node_file_or_environment(cluster: LocalCluster) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    by_file = _hk(["list", "-o", "json", "-c", str(cluster.nodes["node1"].config_path)], base_env)
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout)["leader"] == "node1"
    etcd_args = ["list", "-o", "json", "--etcd", cluster.etcd.url, "--scope", cluster.scope]
    bare = _hk(etcd_args, base_env)
    assert bare.returncode == 1 and "Traceback" not in bare.stderr
    assert "HAKEEPER_ETCD__CACERT" in bare.stderr  # says how to give the etcd's CA and user
    by_env = _hk(etcd_args, {**base_env, **cluster.etcd_env()})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["leader"] == "node1"
    # Credentials inside the URL are refused, not masked.
    userinfo = cluster.etcd.url.replace("https://", "https://hakeeper:pw@")
    res = _hk(["list", "--etcd", userinfo, "--scope", cluster.scope], base_env)
    assert res.returncode == 2 and "must not carry credentials" in res.stderr


class _Catcher(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []

    def do_POST(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        body = b'{"message": "caught"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_cli_refuses_an_api_url_planted_in_etcd(cluster: LocalCluster) -> None:
    """Somebody who can write etcd publishes a member whose api_url is their own server: the
    CLI (with the node file holding the API token) refuses to send anything there, and does so
    only when the operator allows that URL explicitly."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), _Catcher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    planted_url = f"http://127.0.0.1:{server.server_address[1]}"
    key = f"/hakeeper/{cluster.scope}/members/node9"
    _Catcher.seen = []
    try:
        real = _get(cluster, f"/hakeeper/{cluster.scope}/members/node1")
        record = {**json.loads(real), "name": "node9", "api_url": planted_url}
        _put(cluster, key, json.dumps(record))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
        node1 = str(cluster.nodes["node1"].config_path)
        res = _hk(["restart", "node9", "--force", "-c", node1], env)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "node9" in res.stderr and planted_url in res.stderr and "--api-url" in res.stderr
        assert "Traceback" not in res.stderr
        assert _Catcher.seen == [], "a request (with the API token) reached the planted URL"
        # The operator vouches for the URL: now (and only now) it is used.
        res = _hk(["restart", "node9", "--force", "-c", node1, "--api-url", planted_url], env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert [(m, p) for m, p, _ in _Catcher.seen] == [("POST", "/restart")]
        # The real member keeps working with the node file alone.
        res = _hk(["reload", "node1", "-c", node1], env)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        _delete(cluster, key)
        server.shutdown()
        server.server_close()


def _hk(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hakeeper", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    import base64

    return base64.b64decode(text).decode()


def _get(c: LocalCluster, key: str) -> bytes:
    async def go() -> bytes:
        async with c.etcd_client() as client:
            kv = await client.get(key)
        assert kv is not None, key
        return kv.value

    return asyncio.run(go())


def _put(c: LocalCluster, key: str, value: str) -> None:
    async def go() -> None:
        async with c.etcd_client() as client:
            await client.put(key, value)

    asyncio.run(go())


def _delete(c: LocalCluster, key: str) -> None:
    async def go() -> None:
        async with c.etcd_client() as client:
            await client.delete(key)

    asyncio.run(go())
