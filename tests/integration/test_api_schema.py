"""Property-based conformance of the agent API to its OpenAPI document (schemathesis).

Every operation of ``hakeeper/api/openapi.yaml`` is called with generated valid (positive) and
invalid (negative) requests against a real 2-node cluster of its own, authenticated with the
cluster's token.  Checks: no 5xx, documented status codes, content types, headers and response
schemas, and invalid requests rejected with a 4xx.  The cluster may be disrupted (switchovers,
failovers, restarts, reinitialization, config patches): that is why it has its own cluster.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hakeeper.localcluster import LocalCluster
from tests.support.cluster import cluster_tmpdir, free_base_port

pytestmark = pytest.mark.integration


@schemathesis.check
def no_server_error_but_health_503(ctx: Any, response: Any, case: Any) -> bool | None:
    """5xx is always a bug, except the 503 a failing health check answers by design."""
    status = response.status_code
    if status >= 500 and not (
        status == 503 and "health" in (case.operation.definition.raw.get("tags") or [])
    ):
        raise AssertionError(f"server error {status}: {response.text[:300]}")
    return None


POSITIVE_CHECKS = [
    no_server_error_but_health_503,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS = [
    no_server_error_but_health_503,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]
MAX_EXAMPLES = {"GET": 12, "HEAD": 6, "POST": 8, "PATCH": 12, "DELETE": 4}
# Mutating operations run last, the ones that disrupt the most at the very end.
ORDER = {"GET": 0, "HEAD": 0, "PATCH": 1, "DELETE": 2, "POST": 3}
LAST = ("/reinitialize", "/failover", "/switchover")
# Per-member actions: a body naming another member is refused (421) before anything is done.
# The upgrade routes other than /upgrade/check then refuse with 412 (no upgrade in etcd): that
# answer is checked against the document too.
PER_MEMBER = (
    "/restart",
    "/reinitialize",
    "/reload",
    "/upgrade/check",
    "/upgrade/primary",
    "/upgrade/stop",
    "/upgrade/rejoin",
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    base = cluster_tmpdir()
    c = LocalCluster(base, nodes=2, base_port=free_base_port(2))
    try:
        with c:
            c.start()
            c.wait_ready(180)
            yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_every_operation_conforms_to_the_openapi_document(cluster: LocalCluster) -> None:
    c = cluster
    base_url = c.nodes["node1"].api_url
    doc = yaml.safe_load(urllib.request.urlopen(base_url + "/openapi.yaml", timeout=10).read())
    served = _request(base_url + "/openapi.json")
    assert served["paths"].keys() == doc["paths"].keys()
    schema = schemathesis.openapi.from_dict(doc)
    auth = {"Authorization": f"Bearer {c.api_token}"}
    original = _request(base_url + "/config")["config"]

    ops = []
    for r in schema.get_all_operations():
        assert isinstance(r, Ok), r.err()
        ops.append(r.ok())
    ops.sort(
        key=lambda op: (
            ORDER[op.method.upper()],
            op.path in LAST,
            LAST.index(op.path) if op.path in LAST else 0,
        )
    )
    assert len(ops) >= 35
    failures: list[str] = []
    calls = 0
    started = time.monotonic()

    current: list[Any] = [None, None]
    for op in ops:
        method = op.method.upper()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            checks = POSITIVE_CHECKS if mode == schemathesis.GenerationMode.POSITIVE else NEGATIVE_CHECKS
            strategy = op.as_strategy(generation_mode=mode)
            current[:] = [op, checks]

            @settings(
                max_examples=MAX_EXAMPLES[method],
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: Any) -> None:
                nonlocal calls
                op, checks = current
                if op.path == "/config" and isinstance(case.body, dict) and "postgresql" in case.body:
                    # Random PostgreSQL parameters can stop PostgreSQL from starting, which tests
                    # PostgreSQL rather than this API; timing values are restored afterwards.  A
                    # negative case is skipped rather than trimmed: its invalid part may be that one.
                    if checks is not POSITIVE_CHECKS:
                        return
                    case.body.pop("postgresql")
                if (
                    op.path in PER_MEMBER
                    and checks is POSITIVE_CHECKS
                    and isinstance(case.body, dict)
                    and calls % 2 == 0
                ):
                    # Random names only reach the 421 refusal: every other call names this
                    # agent, so that the actions themselves run too.
                    case.body["member"] = "node1"
                headers = dict(case.headers or {})
                headers.pop("Authorization", None)
                case.headers = {**headers, **auth}
                response = case.call(base_url=base_url, timeout=150)
                calls += 1
                try:
                    case.validate_response(response, checks=checks)
                except Exception as e:
                    failures.append(
                        f"{op.method.upper()} {op.path} [{case.body!r} {case.query!r} {case.headers!r}] "
                        f"-> {response.status_code} {response.text[:300]}: {_brief(e)}"
                    )

            try:
                run()
            except Unsatisfiable:
                pass  # negative mode on an operation without parameters: nothing to make invalid
            except Exception as e:  # hypothesis errors (e.g. unsatisfiable strategies)
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {type(e).__name__}: {e}")
            if op.path == "/reinitialize" and method == "POST":
                # A reinitialize runs in the background now: let it end (the replica streams
                # again) before the failover and switchover cases, which need a caught-up replica.
                _wait_reinit_done(base_url)
            if op.path == "/config" and method == "PATCH":
                patch = {k: original.get(k) for k in original if k != "postgresql"}
                _request(base_url + "/config", "PATCH", patch, {**auth, "Content-Type": "application/json"})

    took = time.monotonic() - started
    print(f"schemathesis: {len(ops)} operations, {calls} calls in {took:.1f}s")
    assert not failures, "\n".join(failures[:20])


def _wait_reinit_done(base_url: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        try:
            job = _request(base_url + "/reinitialize")
        except urllib.error.HTTPError as e:
            if e.code == 404:  # none ran (every call was refused)
                return
            raise
        if job.get("state") != "running":
            return
        time.sleep(1.0)
    raise AssertionError(f"the reinitialize did not end within {timeout:.0f}s: {job}")


def _brief(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " / ".join(lines[:4])[:400]
