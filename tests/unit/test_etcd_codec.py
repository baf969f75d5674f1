"""Pure tests of the etcd gateway codec: base64, prefix range ends, omitted-default JSON."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hakeeper.dcs.etcd import (
    KV,
    AuthError,
    EtcdBadResponse,
    EtcdClient,
    EtcdError,
    EtcdRequestError,
    JsonStreamParser,
    LeaseNotFound,
    WatchCompacted,
    _body_error,
    _http_error,
    _watch_result,
    b64,
    b64_key,
    cmp_create,
    cmp_lease,
    cmp_mod,
    cmp_value,
    decode_key,
    header_revision,
    op_delete,
    op_put,
    op_range,
    parse_events,
    parse_kvs,
    parse_txn,
    prefix_range_end,
)


def test_b64_roundtrip_of_keys_and_values() -> None:
    assert b64("/service/a") == base64.b64encode(b"/service/a").decode()
    assert b64(b"\x00\xff") == "AP8="
    assert decode_key(b64_key("/ключ/ü")) == "/ключ/ü"
    assert decode_key(None) == ""


@given(st.text())
def test_key_roundtrip(key: str) -> None:
    # surrogates are what non-UTF-8 key bytes decode to; they must round-trip too
    try:
        key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return
    assert decode_key(b64_key(key)) == key


def test_prefix_range_end_examples() -> None:
    assert prefix_range_end("/svc/") == b"/svc0"
    assert prefix_range_end(b"a") == b"b"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"


_small_bytes = st.binary(max_size=6) | st.lists(
    st.sampled_from([0, 1, 0x2F, 0x30, 0xFE, 0xFF]), max_size=6
).map(bytes)


@given(_small_bytes, _small_bytes, st.booleans())
def test_prefix_range_end_covers_exactly_the_prefix(prefix: bytes, tail: bytes, extend: bool) -> None:
    end = prefix_range_end(prefix)
    key = prefix + tail if extend else tail
    # etcd's rule: range_end "\0" means "every key >= key"
    in_range = prefix <= key and (end == b"\0" or key < end)
    assert in_range == key.startswith(prefix)


def test_kv_from_json_with_omitted_defaults() -> None:
    kv = KV.from_json({"key": b64("/a"), "create_revision": "5", "mod_revision": "7", "version": "2"})
    assert kv == KV(key="/a", value=b"", create_revision=5, mod_revision=7, version=2, lease=0)
    full = KV.from_json(
        {
            "key": b64("/b"),
            "value": b64(b"v"),
            "create_revision": "9041998843796738831",
            "mod_revision": "9041998843796738831",
            "version": "1",
            "lease": "7587868449013546506",
        }
    )
    assert full.create_revision == 9041998843796738831
    assert full.lease == 7587868449013546506
    assert full.value == b"v"


def test_empty_range_has_no_kvs() -> None:
    body = {"header": {"cluster_id": "1", "revision": "41"}}
    assert parse_kvs(body) == []
    assert header_revision(body) == 41
    assert header_revision({}) == 0


def test_failed_txn_has_no_succeeded_field() -> None:
    body = json.loads(
        '{"header":{"revision":"2"},"responses":[{"response_range":{"header":{"revision":"2"},'
        '"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"MQ=="}],'
        '"count":"1"}},{"response_range":{"header":{"revision":"2"}}},{"response_put":{"header":{}}}]}'
    )
    res = parse_txn(body)
    assert res.succeeded is False
    assert res.revision == 2
    assert len(res.ranges) == 2
    assert res.ranges[0][0].key == "a" and res.ranges[0][0].value == b"1"
    assert res.ranges[1] == []
    ok = parse_txn({"header": {"revision": "3"}, "succeeded": True, "responses": [{"response_put": {}}]})
    assert ok.succeeded is True and ok.ranges == []


def test_put_events_have_no_type() -> None:
    result = {
        "header": {"revision": "5"},
        "events": [
            {
                "kv": {
                    "key": b64("/a"),
                    "value": b64("x"),
                    "create_revision": "4",
                    "mod_revision": "4",
                    "version": "1",
                }
            },
            {"type": "DELETE", "kv": {"key": b64("/a"), "mod_revision": "5"}},
        ],
    }
    evs = parse_events(result)
    assert [e.type for e in evs] == ["PUT", "DELETE"]
    assert evs[0].kv.value == b"x"
    assert evs[1].kv.value == b"" and evs[1].kv.mod_revision == 5
    assert parse_events({"header": {}, "created": True}) == []


def test_watch_results() -> None:
    compacted = {"result": {"header": {}, "canceled": True, "compact_revision": "2"}}
    with pytest.raises(WatchCompacted) as ei:
        _watch_result(compacted)
    assert ei.value.compact_revision == 2
    denied = {
        "result": {
            "header": {"revision": "3"},
            "watch_id": "-1",
            "created": True,
            "canceled": True,
            "cancel_reason": "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token",
        }
    }
    with pytest.raises(AuthError) as ai:
        _watch_result(denied)
    assert ai.value.code == 16
    created = {"result": {"header": {"revision": "3"}, "created": True}}
    assert _watch_result(created)["created"] is True


def test_error_mapping() -> None:
    lease = _body_error(
        {
            "error": "etcdserver: requested lease not found",
            "message": "etcdserver: requested lease not found",
            "code": 5,
        },
        404,
    )
    assert isinstance(lease, LeaseNotFound) and lease.code == 5 and lease.http_status == 404
    auth = _body_error({"error": "x", "message": "etcdserver: user name is empty", "code": 3}, 400)
    assert isinstance(auth, AuthError)
    token = _body_error({"message": "etcdserver: invalid auth token", "code": 16}, 401)
    assert isinstance(token, AuthError)
    other = _body_error(
        {"message": "etcdserver: mvcc: required revision has been compacted", "code": 11}, 400
    )
    assert type(other) is EtcdRequestError and other.code == 11
    streaming = _body_error({"error": {"grpc_code": 5, "http_code": 404, "message": "lease not found"}}, 200)
    assert isinstance(streaming, LeaseNotFound) and streaming.http_status == 404


def test_builders() -> None:
    assert cmp_create("/l", "=", 0) == {
        "key": b64("/l"),
        "result": "EQUAL",
        "target": "CREATE",
        "create_revision": "0",
    }
    assert cmp_mod("/l", "<", 7)["result"] == "LESS"
    assert cmp_value("/l", "!=", b"x") == {
        "key": b64("/l"),
        "result": "NOT_EQUAL",
        "target": "VALUE",
        "value": b64("x"),
    }
    assert cmp_lease("/l", ">", 12)["lease"] == "12"
    with pytest.raises(ValueError):
        cmp_create("/l", "==", 0)  # type: ignore[arg-type]
    assert op_put("/k", "v") == {"request_put": {"key": b64("/k"), "value": b64("v")}}
    assert op_put("/k", b"v", lease=99)["request_put"]["lease"] == "99"
    assert op_delete("/p/", prefix=True) == {
        "request_delete_range": {"key": b64("/p/"), "range_end": b64("/p0")}
    }
    assert op_range("/k") == {"request_range": {"key": b64("/k")}}
    assert op_range("/p/", prefix=True)["request_range"]["range_end"] == b64("/p0")


def _stream(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)


@given(
    st.lists(
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=70000 // 100)), max_size=6
    ),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_stream_parser_any_chunking(messages: list[dict[str, object]], cuts: list[int]) -> None:
    data = _stream(messages)
    parser = JsonStreamParser()
    got: list[object] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        got.extend(parser.feed(data[pos : pos + n]))
        pos += n
        i += 1
    assert got == messages
    assert parser.pending() == b""


def test_stream_parser_long_line() -> None:
    # a watch message far over aiohttp's 64 KiB readline limit
    big = {"result": {"events": [{"kv": {"key": b64("/k"), "value": b64(b"x" * 300_000)}}]}}
    data = _stream([big, {"result": {}}])
    parser = JsonStreamParser()
    out: list[object] = []
    for i in range(0, len(data), 16384):
        out.extend(parser.feed(data[i : i + 16384]))
    assert out == [big, {"result": {}}]


def test_repr_hides_password() -> None:
    c = EtcdClient(["http://127.0.0.1:1"], username="root", password="s3cret-pw")
    assert "s3cret-pw" not in repr(c)
    assert "root" in repr(c)
    with pytest.raises(ValueError):
        EtcdClient([])


# -- hostile replies: every decoder raises EtcdBadResponse (an EtcdError), nothing else ------------

_FIELDS = (
    "kvs", "header", "revision", "key", "value", "create_revision", "mod_revision", "version",
    "lease", "ID", "TTL", "result", "responses", "response_range", "succeeded", "events", "kv",
    "type", "created", "canceled", "cancel_reason", "compact_revision", "error", "code",
    "grpc_code", "http_code", "message", "deleted", "token",
)  # fmt: skip

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70).map(str)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "0", "-1", "12", "x", "AP8=", "AP8", "%%%", "é", "1e3", "DELETE", "PUT"])
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=25,
)
_objects = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6)


@given(_json)
def test_decoders_raise_only_bad_response(body: Any) -> None:
    for decode in (parse_kvs, parse_txn, parse_events, header_revision, KV.from_json, _watch_result):
        try:
            decode(body)
        except EtcdError:
            pass
    for status in (200, 400, 503):
        assert isinstance(_http_error(status, json.dumps(body).encode()), EtcdRequestError)
        if isinstance(body, dict):
            assert isinstance(_body_error(body, status), EtcdRequestError)


@given(st.binary(max_size=60))
def test_stream_parser_raises_only_bad_response(data: bytes) -> None:
    parser = JsonStreamParser()
    try:
        parser.feed(data + b"\n")
    except EtcdBadResponse:
        pass


@pytest.mark.parametrize(
    ("field_value", "reason"),
    [("A", "bad base64"), ("AP8", "bad base64"), ("é", "bad base64"), (7, "base64 text")],
)
def test_bad_base64_is_a_bad_response(field_value: Any, reason: str) -> None:
    with pytest.raises(EtcdBadResponse, match=reason):
        parse_kvs({"kvs": [{"key": b64("/k"), "value": field_value}]})


def test_bad_integers_are_bad_responses() -> None:
    with pytest.raises(EtcdBadResponse, match="expected an integer"):
        KV.from_json({"key": b64("/k"), "mod_revision": "x"})
    with pytest.raises(EtcdBadResponse, match="64-bit"):
        KV.from_json({"key": b64("/k"), "lease": str(2**64)})
    with pytest.raises(EtcdBadResponse, match="expected an object"):
        parse_kvs({"kvs": ["x"]})
    with pytest.raises(EtcdBadResponse, match="not a boolean"):
        parse_txn({"succeeded": "false"})  # a truthy string must never read as success
    assert KV.from_json({"key": b64("/k"), "mod_revision": 7}).mod_revision == 7


@given(_objects)
def test_client_calls_raise_only_etcd_errors(body: dict[str, Any]) -> None:
    """Whatever JSON object the gateway answers, a client call returns or raises an EtcdError."""

    async def main() -> None:
        client = EtcdClient(["http://127.0.0.1:1"])

        async def fake_request(path: str, payload: Any, *, timeout: float | None, idempotent: bool) -> Any:
            return body

        client._request = fake_request  # type: ignore[method-assign]
        calls = (
            client.get("/k"),
            client.get_prefix("/p/"),
            client.put("/k", "v"),
            client.delete("/k"),
            client.txn([], []),
            client.lease_grant(5),
            client.lease_keepalive(1),
            client.lease_time_to_live(1),
            client.lease_revoke(1),
            client.compact(1),
        )
        for call in calls:
            try:
                await call
            except EtcdError:
                pass

    asyncio.run(main())
