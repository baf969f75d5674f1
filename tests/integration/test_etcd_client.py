"""EtcdClient and PrefixMirror against a real etcd (Debian's 3.4): CAS, leases, watch, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hakeeper.dcs.etcd import (
    KV,
    AuthError,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    WatchCompacted,
    WatchEvent,
    b64,
    cmp_create,
    op_put,
    op_range,
)
from hakeeper.dcs.mirror import PrefixMirror
from tests.support.etcd_server import EtcdCluster, EtcdServer, make_tls
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient([etcd_server.url], timeout=1.0) as c:
        yield c


class Collector:
    """Runs a watch iterator in a task and queues what it yields (or the error that ended it)."""

    def __init__(self, it: AsyncIterator[WatchEvent]) -> None:
        self.queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[WatchEvent]) -> None:
        try:
            async for ev in it:
                self.queue.put_nowait(ev)
        except Exception as e:
            self.queue.put_nowait(e)

    async def next(self, timeout: float = 10.0) -> WatchEvent:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def take(self, n: int, timeout: float = 10.0) -> list[WatchEvent]:
        return [await self.next(timeout) for _ in range(n)]

    def assert_idle(self) -> None:
        assert self.queue.empty(), f"unexpected extra watch output: {self.queue.get_nowait()!r}"

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def collect(it: AsyncIterator[WatchEvent]) -> AsyncIterator[Collector]:
    c = Collector(it)
    try:
        yield c
    finally:
        await c.stop()


def blocking_put(url: str, key: str, value: str) -> None:
    """A put that blocks the event loop: nothing (no watch reconnect) can run meanwhile."""
    data = json.dumps({"key": b64(key), "value": b64(value)}).encode()
    with urllib.request.urlopen(url + "/v3/kv/put", data=data, timeout=5) as r:
        assert r.status == 200


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------------------------
# KV, txn, leases


async def test_put_get_delete_and_prefix(client: EtcdClient) -> None:
    assert await client.get("/t/missing") is None
    rev1 = await client.put("/t/a", "1")
    rev2 = await client.put("/t/b", b"\x00\xff")
    await client.put("/t0", "outside the prefix")
    await client.put("/t/c", "3")
    assert rev2 > rev1
    kv = await client.get("/t/b")
    assert kv is not None and kv.value == b"\x00\xff" and kv.mod_revision == rev2 and kv.version == 1
    kvs, rev = await client.get_prefix("/t/")
    assert [k.key for k in kvs] == ["/t/a", "/t/b", "/t/c"]
    assert rev >= rev2 + 2
    assert await client.delete("/t/nothing") == 0
    assert await client.delete("/t/", prefix=True) == 3
    assert (await client.get_prefix("/t/"))[0] == []
    assert (await client.get("/t0")) is not None


async def test_cas_create_second_create_fails_and_returns_holder(client: EtcdClient) -> None:
    lease = await client.lease_grant(10)

    async def try_create(value: str) -> tuple[bool, KV | None]:
        r = await client.txn(
            [cmp_create("/svc/leader", "=", 0)],
            [op_put("/svc/leader", value, lease=lease)],
            [op_range("/svc/leader")],
        )
        return r.succeeded, (r.ranges[0][0] if not r.succeeded and r.ranges[0] else None)

    assert await try_create("node1") == (True, None)
    ok, holder = await try_create("node2")
    assert ok is False
    assert holder is not None and holder.value == b"node1" and holder.lease == lease
    stored = await client.get("/svc/leader")
    assert stored is not None and stored.value == b"node1"


async def test_txn_guarded_by_create_revision(client: EtcdClient) -> None:
    await client.put("/g/leader", "me")
    kv = await client.get("/g/leader")
    assert kv is not None
    r = await client.txn([cmp_create("/g/leader", "=", kv.create_revision)], [op_put("/g/leader", "me2")])
    assert r.succeeded and r.ranges == []
    # somebody else deletes and re-creates the key: our guard must fail now
    await client.delete("/g/leader")
    await client.put("/g/leader", "other")
    r = await client.txn(
        [cmp_create("/g/leader", "=", kv.create_revision)],
        [op_put("/g/leader", "me3")],
        [op_range("/g/leader")],
    )
    assert not r.succeeded
    assert r.ranges[0][0].value == b"other"
    assert r.revision == (await client.get_prefix("/g/"))[1]


async def test_lease_keepalive_revoke_and_delete_seen_in_watch(client: EtcdClient) -> None:
    lease = await client.lease_grant(3)
    rev = await client.put("/l/leader", "me", lease=lease)
    async with collect(client.watch_prefix("/l/", rev + 1)) as w:
        for _ in range(3):  # past the TTL: kept alive
            await asyncio.sleep(1.2)
            assert 0 < await client.lease_keepalive(lease) <= 3
        kv = await client.get("/l/leader")
        assert kv is not None and kv.lease == lease
        assert 0 < await client.lease_time_to_live(lease) <= 3
        t0 = time.monotonic()
        await client.lease_revoke(lease)
        ev = await w.next(timeout=5)
        assert ev.type == "DELETE" and ev.kv.key == "/l/leader" and ev.kv.value == b""
        assert time.monotonic() - t0 < 2.0
    assert await client.get("/l/leader") is None
    with pytest.raises(LeaseNotFound):
        await client.lease_keepalive(lease)
    assert await client.lease_time_to_live(lease) == -1
    await client.lease_revoke(lease)  # already gone: no error
    assert await client.lease_time_to_live(123456789) == -1


async def test_lease_expiry_deletes_key(client: EtcdClient) -> None:
    lease = await client.lease_grant(1)
    await client.put("/x/eph", "v", lease=lease)

    async def gone() -> bool:
        return await client.get("/x/eph") is None

    await eventually(gone, timeout=8)
    with pytest.raises(LeaseNotFound):
        await client.lease_keepalive(lease)


# ------------------------------------------------------------------------------------------------
# watch


async def test_watch_delivers_put_and_delete_in_order(client: EtcdClient) -> None:
    base = await client.put("/w/a", "0")
    async with collect(client.watch_prefix("/w/", base)) as w:  # from the past: includes the first put
        await client.put("/w/b", "1")
        await client.put("/wx", "not in prefix")
        await client.delete("/w/a")
        await client.txn([], [op_put("/w/c", "2"), op_put("/w/d", "3")])
        evs = await w.take(5)
        assert [(e.type, e.kv.key) for e in evs] == [
            ("PUT", "/w/a"),
            ("PUT", "/w/b"),
            ("DELETE", "/w/a"),
            ("PUT", "/w/c"),
            ("PUT", "/w/d"),
        ]
        assert evs[1].kv.value == b"1" and evs[1].kv.create_revision == evs[1].kv.mod_revision
        assert evs[0].kv.mod_revision == base
        assert evs[3].kv.mod_revision == evs[4].kv.mod_revision  # one txn, one revision
        await asyncio.sleep(0.2)
        w.assert_idle()
    # start_revision 0: only what happens from now on
    async with collect(client.watch_prefix("/w/", 0)) as w2:
        await asyncio.sleep(0.3)
        await client.put("/w/e", "4")
        ev = await w2.next()
        assert ev.kv.key == "/w/e"


async def test_watch_large_value(client: EtcdClient) -> None:
    big = b"v" * 200_000  # one JSON line far over aiohttp's 64 KiB readline limit
    rev = await client.put("/big/k", big)
    async with collect(client.watch_prefix("/big/", rev)) as w:
        ev = await w.next()
        assert ev.kv.value == big


async def test_watch_survives_kill9_and_restart(etcd_server: EtcdServer, client: EtcdClient) -> None:
    rev = await client.put("/k9/before", "1")
    async with collect(client.watch_prefix("/k9/", rev)) as w:
        assert (await w.next()).kv.key == "/k9/before"
        etcd_server.kill9()
        with pytest.raises(EtcdUnavailable):
            await client.get("/k9/before")
        await asyncio.sleep(0.5)  # let the watch notice and start reconnecting
        etcd_server.restart()
        # written before the watch can possibly have reconnected: it must resume, not start anew
        blocking_put(etcd_server.url, "/k9/after1", "2")
        await client.put("/k9/after2", "3")
        await client.delete("/k9/before")
        evs = await w.take(3, timeout=15)
        assert [(e.type, e.kv.key) for e in evs] == [
            ("PUT", "/k9/after1"),
            ("PUT", "/k9/after2"),
            ("DELETE", "/k9/before"),
        ]
        await asyncio.sleep(0.3)
        w.assert_idle()


async def test_stale_pooled_connection_is_retried(etcd_server: EtcdServer, client: EtcdClient) -> None:
    await client.put("/stale/a", "1")  # leaves a pooled keep-alive connection
    etcd_server.kill9()
    etcd_server.restart()  # blocking: the loop has not seen the old connection die
    # a write goes through although its pooled connection is dead
    assert await client.put("/stale/a", "2") > 0
    kv = await client.get("/stale/a")
    assert kv is not None and kv.value == b"2"


async def test_sigstop_calls_time_out_then_recover(etcd_server: EtcdServer) -> None:
    async with EtcdClient([etcd_server.url], timeout=0.5) as c:
        rev = await c.put("/stop/a", "1")
        lease = await c.lease_grant(30)
        async with collect(c.watch_prefix("/stop/", rev + 1)) as w:
            await asyncio.sleep(0.2)
            etcd_server.sigstop()
            try:
                for call in (
                    lambda: c.get("/stop/a"),
                    lambda: c.put("/stop/a", "2"),
                    lambda: c.lease_keepalive(lease),
                    lambda: c.get("/stop/a", timeout=0.3),
                ):
                    t0 = time.monotonic()
                    with pytest.raises(EtcdUnavailable):
                        await call()
                    assert time.monotonic() - t0 < 2.0
            finally:
                etcd_server.sigcont()
            await c.put("/stop/b", "3")
            kv = await c.get("/stop/b")
            assert kv is not None and kv.value == b"3"
            assert await c.lease_keepalive(lease) > 0
            evs = await w.take(1)
            # the put during SIGSTOP may or may not have been applied (the request was sent)
            if evs[0].kv.key == "/stop/a":
                assert evs[0].kv.value == b"2"
                evs = await w.take(1)
            assert evs[0].kv.key == "/stop/b"


async def test_watch_from_compacted_revision_raises(client: EtcdClient) -> None:
    first = await client.put("/c/a", "1")
    for i in range(5):
        last = await client.put("/c/a", str(i))
    await client.compact(last)
    it = client.watch_prefix("/c/", first)
    with pytest.raises(WatchCompacted) as ei:
        await asyncio.wait_for(anext(it), 5)
    assert ei.value.compact_revision == last
    # watching from the current revision works again
    async with collect(client.watch_prefix("/c/", last + 1)) as w:
        await client.put("/c/b", "x")
        assert (await w.next()).kv.key == "/c/b"


# ------------------------------------------------------------------------------------------------
# endpoints


async def test_dead_first_endpoint_rotation(etcd_server: EtcdServer) -> None:
    (dead,) = free_ports(1)
    dead_url = f"http://127.0.0.1:{dead}"
    async with EtcdClient([dead_url, etcd_server.url], timeout=1.0) as c:
        assert c.endpoint == dead_url
        rev = await c.put("/ep/a", "1")  # connection refused: surely not delivered, so retried
        assert c.endpoint == etcd_server.url
        kv = await c.get("/ep/a")
        assert kv is not None and kv.mod_revision == rev
        r = await c.txn([cmp_create("/ep/b", "=", 0)], [op_put("/ep/b", "2")])
        assert r.succeeded
        lease = await c.lease_grant(5)
        assert await c.lease_keepalive(lease) > 0
        async with collect(c.watch_prefix("/ep/", rev)) as w:
            assert [e.kv.key for e in await w.take(2)] == ["/ep/a", "/ep/b"]
    # the watch alone also finds the live endpoint
    async with EtcdClient([dead_url, etcd_server.url], timeout=1.0) as c2:
        async with collect(c2.watch_prefix("/ep/", rev)) as w:
            assert (await w.next()).kv.key == "/ep/a"
    # nothing alive: EtcdUnavailable, quickly (refused connections)
    (d2,) = free_ports(1)
    async with EtcdClient([dead_url, f"http://127.0.0.1:{d2}"], timeout=1.0) as c3:
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await c3.get("/ep/a")
        with pytest.raises(EtcdUnavailable):
            await c3.put("/ep/a", "x")
        assert time.monotonic() - t0 < 4.0


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "cluster", 3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_cluster_member_failures(etcd_cluster: EtcdCluster) -> None:
    m0 = etcd_cluster.members[0]
    async with EtcdClient(etcd_cluster.urls, timeout=0.8) as c:
        rev = await c.put("/cl/a", "1")
        assert c.endpoint == m0.url
        async with collect(c.watch_prefix("/cl/", rev + 1)) as w:
            await asyncio.sleep(0.3)
            # frozen member: a read moves on within about one timeout; a write is not retried
            m0.sigstop()
            try:
                # the write reached m0 and may be applied after SIGCONT: not retried elsewhere
                t0 = time.monotonic()
                with pytest.raises(EtcdUnavailable):
                    await c.put("/other/p", "x")
                assert time.monotonic() - t0 < 0.8 + 0.5
                assert c.endpoint != m0.url  # the next call starts on another member
                c._idx = 0  # back to the frozen member for the read
                t0 = time.monotonic()
                kv = await c.get("/cl/a")
                assert kv is not None and kv.value == b"1"
                assert time.monotonic() - t0 < 2 * 0.8 + 0.5
                assert c.endpoint != m0.url
            finally:
                m0.sigcont()
            # kill the member in use: calls and the watch carry on through the others
            in_use = next(m for m in etcd_cluster.members if m.url == c.endpoint)
            in_use.kill9()

            async def put_ok() -> bool:
                try:
                    await c.put("/cl/b", "2")
                    return True
                except EtcdError:
                    return False  # e.g. a leader election in progress

            await eventually(put_ok, timeout=15, interval=0.2)
            evs = await w.take(1, timeout=15)
            assert evs[0].kv.key == "/cl/b"
            assert c.endpoint != in_use.url


# ------------------------------------------------------------------------------------------------
# auth and TLS


async def _gateway(url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=payload) as r:
        body: dict[str, Any] = await r.json(content_type=None)
        assert r.status == 200, body
        return body


async def test_auth(etcd_server: EtcdServer) -> None:
    url = etcd_server.url
    await _gateway(url, "/v3/auth/user/add", {"name": "root", "password": "rootpw"})
    await _gateway(url, "/v3/auth/role/add", {"name": "root"})
    await _gateway(url, "/v3/auth/user/grant", {"user": "root", "role": "root"})
    await _gateway(url, "/v3/auth/enable", {})

    async with EtcdClient([url], username="root", password="rootpw") as c:
        assert "rootpw" not in repr(c)
        rev = await c.put("/auth/a", "1")
        kv = await c.get("/auth/a")
        assert kv is not None and kv.value == b"1"
        lease = await c.lease_grant(5)
        assert await c.lease_keepalive(lease) > 0
        async with collect(c.watch_prefix("/auth/", rev)) as w:
            assert (await w.next()).kv.key == "/auth/a"
            # etcd's simple tokens live in memory: a restart invalidates ours
            etcd_server.restart()
            await c.put("/auth/b", "2")  # re-authenticates once and retries
            assert (await w.next(timeout=15)).kv.key == "/auth/b"

    async with EtcdClient([url]) as anon:
        with pytest.raises(AuthError):
            await anon.get("/auth/a")
        with pytest.raises(AuthError):
            await asyncio.wait_for(anext(anon.watch_prefix("/auth/", 0)), 5)
    async with EtcdClient([url], username="root", password="wrong") as bad:
        with pytest.raises(AuthError) as ei:
            await bad.put("/auth/a", "x")
        assert "wrong" not in str(ei.value)


async def test_tls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    server = EtcdServer(tmp_path / "etcd-tls" / "data", tls=tls)
    server.start()
    try:
        assert server.url.startswith("https://")
        async with EtcdClient([server.url], cacert=tls.ca, cert=tls.client_cert, key=tls.client_key) as c:
            rev = await c.put("/tls/a", "1")
            kv = await c.get("/tls/a")
            assert kv is not None and kv.value == b"1"
            async with collect(c.watch_prefix("/tls/", rev)) as w:
                assert (await w.next()).kv.key == "/tls/a"
        # no client certificate: refused
        async with EtcdClient([server.url], cacert=tls.ca, timeout=1.0) as nocert:
            with pytest.raises(EtcdError):
                await nocert.get("/tls/a")
        # server certificate not trusted: refused
        async with EtcdClient(
            [server.url], cert=tls.client_cert, key=tls.client_key, timeout=1.0
        ) as untrusted:
            with pytest.raises(EtcdUnavailable):
                await untrusted.get("/tls/a")
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# PrefixMirror


@contextlib.asynccontextmanager
async def running(mirror: PrefixMirror) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(mirror.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()


def values(mirror: PrefixMirror) -> dict[str, bytes]:
    return {k: kv.value for k, kv in mirror.kvs.items()}


async def test_mirror_follows_puts_and_deletes(client: EtcdClient) -> None:
    await client.put("/m/a", "1")
    await client.put("/m/b", "2")
    await client.put("/mx", "outside")
    mirror = PrefixMirror(client, "/m/")
    assert not mirror.synced
    with pytest.raises(TimeoutError):
        await mirror.wait_synced(0.05)
    async with running(mirror) as task:
        await mirror.wait_synced(5)
        assert values(mirror) == {"/m/a": b"1", "/m/b": b"2"}
        mirror.changed.clear()
        rev = await client.put("/m/c", "3")
        await client.delete("/m/a")
        await asyncio.wait_for(mirror.changed.wait(), 5)
        await eventually(lambda: "/m/a" not in mirror.kvs)
        assert values(mirror) == {"/m/b": b"2", "/m/c": b"3"}
        assert mirror.revision > rev
        assert time.monotonic() - mirror.last_update_monotonic < 5
        before = mirror.revision
        await mirror.resync()
        assert mirror.synced and mirror.revision >= before
        assert values(mirror) == {"/m/b": b"2", "/m/c": b"3"}
        await client.put("/m/d", "4")
        await eventually(lambda: "/m/d" in mirror.kvs)
        # several keys in one txn share a revision: all of them are applied
        await client.txn([], [op_put("/m/e", "5"), op_put("/m/f", "6"), op_put("/m/b", "7")])
        await eventually(lambda: {"/m/e", "/m/f"} <= mirror.kvs.keys())
        assert values(mirror) == {"/m/b": b"7", "/m/c": b"3", "/m/d": b"4", "/m/e": b"5", "/m/f": b"6"}
        assert not task.done()


async def test_mirror_survives_kill9_and_restart(etcd_server: EtcdServer, client: EtcdClient) -> None:
    await client.put("/mk/a", "1")
    mirror = PrefixMirror(client, "/mk/")
    async with running(mirror) as task:
        await mirror.wait_synced(5)
        etcd_server.kill9()
        await asyncio.sleep(0.5)
        etcd_server.restart()
        blocking_put(etcd_server.url, "/mk/b", "2")  # before the mirror's watch can reconnect
        await client.delete("/mk/a")
        await eventually(lambda: values(mirror) == {"/mk/b": b"2"}, timeout=15)
        assert mirror.synced and not task.done()


async def test_mirror_relists_after_compaction(client: EtcdClient) -> None:
    r1 = await client.put("/mc/a", "1")
    await client.put("/mc/b", "2")
    await client.delete("/mc/a")
    r_last = await client.put("/mc/c", "3")
    await client.compact(r_last)
    mirror = PrefixMirror(client, "/mc/")
    # Pretend the mirror had listed at r1 and its watch then fell behind past a compaction (as if it
    # had been disconnected for long): the resumed watch hits WatchCompacted, and the mirror re-lists.
    mirror.kvs = {"/mc/a": KV("/mc/a", b"1", r1, r1, 1, 0)}
    mirror.revision = r1
    mirror._set_synced(True)
    async with running(mirror) as task:
        await eventually(lambda: values(mirror) == {"/mc/b": b"2", "/mc/c": b"3"}, timeout=10)
        assert mirror.revision >= r_last and mirror.synced
        await client.put("/mc/d", "4")
        await eventually(lambda: "/mc/d" in mirror.kvs)
        assert not task.done()


async def test_mirror_unavailable_then_synced(etcd_server: EtcdServer) -> None:
    (dead,) = free_ports(1)
    async with EtcdClient([f"http://127.0.0.1:{dead}"], timeout=0.3) as dead_client:
        mirror = PrefixMirror(dead_client, "/mu/")
        async with running(mirror) as task:
            await asyncio.sleep(1.0)
            assert not mirror.synced and not task.done()  # keeps retrying
            with pytest.raises(EtcdUnavailable):
                await mirror.resync()
    # sanity: the b64 helper used by gateway calls in this module
    assert b64("x") == "eA=="
