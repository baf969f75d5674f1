"""An in-memory copy of every key under an etcd prefix, kept current by a watch."""

from __future__ import annotations

import asyncio
import time

from hakeeper.dcs.etcd import (
    KV,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    WatchCompacted,
    WatchEvent,
    WatchStalled,
)
from hakeeper.util.log import get_logger

log = get_logger(__name__)

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
STALL_TIMEOUT_MIN = 10.0


def stall_timeout_for(ttl: float) -> float:
    """How long a confirmed watch may stay silent before the mirror re-lists: 2 x ttl, at least
    10 s.  Every agent re-publishes its member record at least once per loop_wait (< ttl), so a
    healthy watch of a running cluster is never silent that long."""
    return max(2.0 * ttl, STALL_TIMEOUT_MIN)


class PrefixMirror:
    """Mirrors ``prefix``: a range, then a watch from the range's revision + 1.

    ``kvs`` maps full keys to their :class:`KV`. ``synced`` is False until the first successful
    list and again after a failed re-list. ``changed`` is set after every applied list or batch of
    events (consumers clear it). Events at or below ``revision`` are ignored, so a :meth:`resync`
    racing the watch never moves the copy backwards.

    ``stall_timeout``: a watch silent for that long (no event, no progress notification) is
    re-opened after a re-list (``etcd_watch_stalled``); read when each watch starts.
    """

    def __init__(self, client: EtcdClient, prefix: str, *, stall_timeout: float | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.stall_timeout = stall_timeout
        self.kvs: dict[str, KV] = {}
        self.changed_keys: set[str] = set()  # since the last take_changed(); "" = re-listed
        self.revision = 0
        self._listed_revision = 0
        self.synced = False
        self.changed = asyncio.Event()
        self.last_update_monotonic = 0.0
        self._synced_event = asyncio.Event()
        self._list_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._running = False
        self._need_list = False
        self._listed = asyncio.Event()  # set after every list attempt in run()

    def __repr__(self) -> str:
        return f"PrefixMirror(prefix={self.prefix!r}, keys={len(self.kvs)}, revision={self.revision})"

    def _set_synced(self, value: bool) -> None:
        self.synced = value
        if value:
            self._synced_event.set()
        else:
            self._synced_event.clear()

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Return once the mirror is synced; raise :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._synced_event.wait()

    async def _list(self) -> None:
        async with self._list_lock:
            try:
                kvs, revision = await self.client.get_prefix(self.prefix)
            except EtcdError:
                self._set_synced(False)
                raise
            self.kvs = {kv.key: kv for kv in kvs}
            self.revision = revision
            self._listed_revision = revision
            self.last_update_monotonic = time.monotonic()
            self._set_synced(True)
            self.changed_keys.add("")
            self.changed.set()
            log.debug("mirror_listed", prefix=self.prefix, keys=len(kvs), revision=revision)

    def take_changed(self) -> set[str]:
        """The keys changed since the last call ("" stands for a re-list of everything)."""
        keys, self.changed_keys = self.changed_keys, set()
        return keys

    async def resync(self) -> None:
        """Re-read the prefix now (the cache proved stale). Raises :class:`EtcdError` on failure,
        leaving ``synced`` False and making :meth:`run` re-list and re-watch.

        While :meth:`run` is active, it does the re-list itself between stopping and restarting
        the watch: an event applied while a range is in flight would otherwise be overwritten by
        the (older) list and never seen again."""
        if not self._running:
            await self._list()
            return
        self._need_list = True
        self._listed.clear()
        task = self._watch_task
        if task is not None and not task.done():
            task.cancel()
        try:
            async with asyncio.timeout(self.client.timeout * max(1, len(self.client.endpoints)) + 1):
                await self._listed.wait()
        except TimeoutError:
            raise EtcdUnavailable("re-list of the cluster keys did not finish in time") from None
        if not self.synced:
            raise EtcdUnavailable("re-list of the cluster keys failed")

    def _apply(self, ev: WatchEvent) -> bool:
        kv = ev.kv
        # Events of one txn share a revision, so compare with the revision of the last *list*
        # (what it already contains), never with the last event applied.
        if kv.mod_revision <= self._listed_revision:
            return False  # already contained in a newer list
        if ev.type == "DELETE":
            self.kvs.pop(kv.key, None)
        else:
            self.kvs[kv.key] = kv
        self.revision = kv.mod_revision
        return True

    async def _follow(self) -> None:
        """Apply watch events until the watch raises. Consecutive events that arrive without the
        watch yielding to the loop are one batch: ``changed`` is set once nobody else can run."""
        watch = self.client.watch_prefix(self.prefix, self.revision + 1, stall_timeout=self.stall_timeout)
        async for ev in watch:
            if self._apply(ev):
                self.last_update_monotonic = time.monotonic()
                self.changed_keys.add(ev.kv.key)
                self.changed.set()

    async def run(self) -> None:
        """List, then watch; re-list on compaction or failure. Runs until cancelled."""
        backoff = _BACKOFF_MIN
        self._running = True
        try:
            await self._run(backoff)
        finally:
            self._running = False
            self._listed.set()

    async def _run(self, backoff: float) -> None:
        while True:
            try:
                if not self.synced or self._need_list:
                    self._need_list = False
                    try:
                        await self._list()
                    finally:
                        self._listed.set()
                backoff = _BACKOFF_MIN
                self._watch_task = asyncio.create_task(self._follow(), name=f"mirror-watch {self.prefix}")
                try:
                    await asyncio.wait({self._watch_task})
                finally:
                    task, self._watch_task = self._watch_task, None
                    if not task.done():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                if task.cancelled():
                    # resync() stopped the watch to re-list; if its list failed, list again here
                    continue
                task.result()  # raises what stopped the watch
                self._set_synced(False)  # the watch never ends on its own; be safe if it does
            except (WatchCompacted, WatchStalled) as e:
                if isinstance(e, WatchStalled):
                    # Unary requests use other connections and may well work: the re-list tells
                    # what the silent stream missed.
                    log.warning(
                        "etcd_watch_stalled", prefix=self.prefix, silent_for=e.seconds, revision=self.revision
                    )
                else:
                    log.info(
                        "mirror_watch_compacted",
                        prefix=self.prefix,
                        compact_revision=e.compact_revision,
                        revision=self.revision,
                    )
                # re-list at once; stay "synced" with the old copy unless the re-list fails
                try:
                    await self._list()
                except EtcdError as le:
                    log.warning("mirror_list_failed", prefix=self.prefix, error=str(le))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
            except EtcdError as e:
                self._set_synced(False)
                log.warning("mirror_sync_failed", prefix=self.prefix, error=str(e), backoff=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception:
                # Not expected (the client turns every bad reply into an EtcdError), but this
                # task ending would end the agent, and the agent's shutdown stops PostgreSQL:
                # a copy we can no longer vouch for is marked stale and rebuilt instead.
                self._set_synced(False)
                log.exception("mirror_crashed", prefix=self.prefix, backoff=_BACKOFF_MAX)
                await asyncio.sleep(_BACKOFF_MAX)
