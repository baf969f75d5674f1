"""Backup repositories: where WAL and base backups are stored (issue 5).

A :class:`Repository` stores named objects in the form of :mod:`hakeeper.backup.codec`
(zstd + a SHA-256 trailer), so every read is verified.  Two implementations:

* :class:`FilesystemRepository`: a directory; every write goes to a temporary file in the
  target directory, is fsynced, renamed into place and the directory fsynced, so a reader never
  sees a partial object and a stored object survives a crash.
* :class:`S3Repository`: an S3-compatible object store through aiobotocore (path-style
  addressing, as SeaweedFS and most self-hosted stores need).

Object names are relative paths of ``/``-separated components made of letters, digits and
``_.:+-``, never starting with ``.`` (temporary files do, so they never collide or get listed).

``put_unique`` is the duplicate policy WAL archiving needs: a re-push of identical content
succeeds, different content for an existing name is never overwritten but stored under
``quarantine/<name>.<UTC timestamp>`` and reported as :class:`ContentConflict`.

Encryption (``key``): every object's stored form is sealed by :mod:`hakeeper.backup.cipher`
between the public operations and the storage primitives, so that every caller (archiver,
backups, dumps, records, restore, verify, copy, expire) reads and writes plaintext unchanged.
Comparisons of content (``put_unique``, copies) use the SHA-256 in the authenticated codec
trailer, so identical content is recognised although its sealed bytes differ every time.
An encrypted repository holds :data:`MARKER` (in the clear: the cipher and key fingerprint,
never the key); a repository instance checks it before its first write and refuses to mix plain
and encrypted objects or two keys in one repository.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from hakeeper.backup import cipher, codec
from hakeeper.backup.errors import (
    ContentConflict,
    CorruptObject,
    EncryptionMismatch,
    NotFound,
    RepoError,
    RepoUnavailable,
)
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.log import get_logger

log = get_logger(__name__)

CHUNK = 1 << 20  # read and compress in 1 MiB steps
_INLINE_LIMIT = 256 * 1024  # smaller payloads are encoded on the loop; larger ones in a thread
_NAME_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]*$")
QUARANTINE = "quarantine"
MARKER = "hakeeper-repository.json"  # an encrypted repository's cipher and key fingerprint
# a sealed object's tail that stat may read: footer + the final record (the codec trailer, or
# at most one chunk for objects that are not codec objects); bounds what a forged footer asks
_MAX_SEALED_TAIL = cipher.FOOTER_LEN + 5 + cipher.CHUNK + cipher.TAG_BYTES
KeySource = bytes | Callable[[], bytes] | None


def check_name(name: str) -> str:
    """``name`` if it is a valid object name, else ValueError (a programming error, not I/O)."""
    parts = name.split("/")
    if not name or len(name) > 900 or not all(_NAME_COMPONENT.match(p) for p in parts):
        raise ValueError(f"invalid object name {name!r}")
    return name


def quarantine_name(name: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{QUARANTINE}/{name}.{stamp}"


class Outcome(enum.StrEnum):
    STORED = "stored"
    ALREADY_PRESENT = "already_present"  # put_unique: identical content was there already


@dataclass(frozen=True, slots=True)
class PutResult:
    name: str
    size: int  # uncompressed
    stored_size: int
    sha256: str  # of the uncompressed content
    outcome: Outcome = Outcome.STORED


@dataclass(frozen=True, slots=True)
class ObjectStat:
    name: str
    size: int  # uncompressed, from the trailer
    stored_size: int
    sha256: str
    meta: Mapping[str, str]
    modified: datetime


@dataclass(frozen=True, slots=True)
class ListEntry:
    name: str
    stored_size: int
    modified: datetime


class Repository(ABC):
    """One backup repository.  All methods are coroutines and never block the event loop.

    Errors: :class:`NotFound` when the object is absent; :class:`CorruptObject` when it fails
    verification; :class:`RepoUnavailable` (or another :class:`RepoError`) when the answer is
    not known.  ``delete`` of a missing object succeeds.
    """

    kind: str = ""

    def __init__(
        self,
        name: str,
        *,
        level: int = codec.DEFAULT_LEVEL,
        threads: int = 0,
        offsite: bool = False,
        key: KeySource = None,
    ) -> None:
        self.name = name
        self.level = level
        self.threads = threads
        self.offsite = offsite
        # the key is loaded on first use: a key file the process cannot read is then a
        # RepoError of this repository (reported like any other), not a crash at construction
        self._key_source = key
        self._cipher_key: cipher.Key | None = None
        self._marker_checked = False
        self._marker_lock = asyncio.Lock()

    @property
    def encrypted(self) -> bool:
        return self._key_source is not None

    # ------------------------------------------------------------------ storage primitives
    @abstractmethod
    async def _store(self, name: str, blob: bytes, trailer: codec.Trailer, *, exclusive: bool) -> bool:
        """Store an encoded object.  With ``exclusive``, return False (and store nothing) if
        the name exists."""

    @abstractmethod
    async def _store_stream(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        """Store an encoded object from a stream (overwriting); return the stored size."""

    @abstractmethod
    def _load_stream(self, name: str) -> AsyncGenerator[bytes, None]:
        """The stored bytes of ``name`` in chunks (NotFound before the first one if absent)."""

    @abstractmethod
    async def _load_tail(self, name: str, length: int) -> tuple[bytes, int, datetime]:
        """The last ``length`` stored bytes (fewer if the object is shorter), the stored size
        and the modification time."""

    @abstractmethod
    async def list_objects(self, prefix: str = "") -> list[ListEntry]:
        """Objects whose name starts with ``prefix`` (a plain string prefix), sorted by name."""

    @abstractmethod
    async def delete(self, name: str) -> None: ...

    @abstractmethod
    async def initialize(self) -> None:
        """Create the repository's root (directory or bucket) if missing.  For set-up (demo,
        tests, an explicit command), never implicitly: a missing root may be a missing mount."""

    async def close(self) -> None:
        """Release connections (none by default)."""
        return None

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ public operations
    async def _encode(
        self, data: bytes, meta: Mapping[str, str] | None, *, as_is: bool = False
    ) -> tuple[bytes, codec.Trailer]:
        m = codec.validate_meta(meta or {})
        if as_is:
            return await asyncio.to_thread(codec.encode_raw, data, m)
        if len(data) <= _INLINE_LIMIT:
            return codec.encode(data, m, self.level, 0)
        return await asyncio.to_thread(codec.encode, data, m, self.level, self.threads)

    async def put(
        self, name: str, data: bytes, *, meta: Mapping[str, str] | None = None, as_is: bool = False
    ) -> PutResult:
        """Store ``data`` as ``name``, replacing any existing object (atomically).  ``as_is``:
        the data is already compressed; store it without compressing it again."""
        check_name(name)
        blob, trailer = await self._encode(data, meta, as_is=as_is)
        _, stored = await self._write(name, blob, trailer, exclusive=False)
        return PutResult(name, trailer.size, stored, trailer.sha256)

    async def create(self, name: str, data: bytes) -> bool:
        """Store ``data`` as ``name`` only if no object has that name (FS: ``link``; S3:
        ``If-None-Match: *``); False, with nothing stored, if one has.  A claim: of two
        concurrent creates of one name, exactly one returns True."""
        check_name(name)
        blob, trailer = await self._encode(data, None)
        stored, _ = await self._write(name, blob, trailer, exclusive=True)  # sealed, marker checked
        return stored

    async def put_stream(
        self,
        name: str,
        chunks: AsyncIterable[bytes],
        *,
        meta: Mapping[str, str] | None = None,
        as_is: bool = False,
    ) -> PutResult:
        """Store the concatenated ``chunks`` as ``name`` (replacing), compressing as they come
        (``as_is``: already compressed, stored as :meth:`put` with ``as_is`` stores it)."""
        check_name(name)
        m = codec.validate_meta(meta or {})
        enc: codec.Encoder | codec.RawEncoder = (
            codec.RawEncoder() if as_is else codec.Encoder(self.level, self.threads)
        )
        done: list[codec.Trailer] = []

        async def encoded() -> AsyncGenerator[bytes, None]:
            async for chunk in chunks:
                out = await asyncio.to_thread(enc.update, chunk)
                if out:
                    yield out
            tail, trailer = await asyncio.to_thread(enc.finish, m)
            done.append(trailer)
            yield tail

        async with aclosing(encoded()) as stream:
            stored = await self._write_stream(name, stream)
        trailer = done[0]
        return PutResult(name, trailer.size, stored, trailer.sha256)

    async def put_unique(self, name: str, data: bytes, *, meta: Mapping[str, str] | None = None) -> PutResult:
        """Store ``data`` as ``name`` unless that name exists.

        Identical content already there (same size and SHA-256): success, ``ALREADY_PRESENT``.
        Other content there (or an unreadable object): the existing object stays, the new
        content goes to :func:`quarantine_name` and :class:`ContentConflict` is raised.
        """
        check_name(name)
        blob, trailer = await self._encode(data, meta)
        for _ in range(5):
            try:
                existing: str | None = (await self.stat(name)).sha256
            except NotFound:
                created, stored = await self._write(name, blob, trailer, exclusive=True)
                if created:
                    return PutResult(name, trailer.size, stored, trailer.sha256)
                continue  # created by someone else meanwhile: compare with theirs
            except CorruptObject:
                existing = None
            if existing == trailer.sha256:
                return PutResult(name, trailer.size, len(blob), trailer.sha256, Outcome.ALREADY_PRESENT)
            quarantined = quarantine_name(name)
            await self._write(quarantined, blob, trailer, exclusive=False)
            log.error(
                "object_conflict_quarantined",
                repo=self.name,
                object=name,
                quarantined=quarantined,
                existing_sha256=existing,
                new_sha256=trailer.sha256,
            )
            raise ContentConflict(self.name, name, quarantined, existing, trailer.sha256)
        raise RepoUnavailable(f"{self.name}: {name}: object appears and disappears; giving up")

    async def get(self, name: str) -> bytes:
        """The verified content of ``name`` (whole in memory; see :meth:`get_stream`)."""
        check_name(name)
        parts: list[bytes] = []
        async with aclosing(self._read_stream(name)) as raw:
            async for chunk in raw:
                parts.append(chunk)
        blob = b"".join(parts)
        if len(blob) <= _INLINE_LIMIT:
            return codec.decode(blob, name)[0]
        return (await asyncio.to_thread(codec.decode, blob, name))[0]

    async def get_stream(self, name: str) -> AsyncIterator[bytes]:
        """The content of ``name`` in chunks.  The checksum is checked at the end: a
        :class:`CorruptObject` may come after data was yielded, so a caller writing to a file
        must discard it on any error."""
        check_name(name)
        dec = codec.Decoder(name)
        async with aclosing(self._read_stream(name)) as raw:
            async for chunk in raw:
                out = await asyncio.to_thread(dec.feed, chunk)
                if out:
                    yield out
        rest, _ = await asyncio.to_thread(dec.finish)
        if rest:
            yield rest

    async def stat(self, name: str) -> ObjectStat:
        """Size, checksum and metadata of ``name``, read from its trailer (without the content)."""
        check_name(name)
        tail, stored, modified = await self._read_tail(name)
        _, trailer = codec.parse_trailer(tail, name)
        return ObjectStat(name, trailer.size, stored, trailer.sha256, dict(trailer.meta), modified)

    # ------------------------------------------------------------------ stored bytes (copies)
    async def get_stored(self, name: str) -> AsyncIterator[bytes]:
        """The codec form of ``name`` (compressed content and trailer) in chunks, its checksum
        unverified: for copying an object to another repository without recompressing it
        (``hakeeper backup copy``).  From an encrypted repository it comes decrypted (and
        authenticated), so that the target seals it with its own key, or stores it plain."""
        check_name(name)
        async with aclosing(self._read_stream(name)) as raw:
            async for chunk in raw:
                yield chunk

    async def put_stored(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        """Store ``chunks``, the codec form of an object read with :meth:`get_stored`, as
        ``name`` (replacing; atomically as every write; sealed if this repository is encrypted);
        return the stored size.  An error raised by ``chunks`` before its end stores nothing."""
        check_name(name)

        async def it() -> AsyncGenerator[bytes, None]:
            async for c in chunks:
                yield c

        async with aclosing(it()) as stream:
            return await self._write_stream(name, stream)

    # ------------------------------------------------------------------ encryption layer
    def _cipher(self) -> cipher.Key | None:
        if self._cipher_key is None and self._key_source is not None:
            src = self._key_source
            try:
                self._cipher_key = cipher.Key.from_bytes(src() if callable(src) else src)
            except ValueError as e:
                raise RepoError(f"repository {self.name}: encryption key: {e}") from None
        return self._cipher_key

    async def _write(
        self, name: str, blob: bytes, trailer: codec.Trailer, *, exclusive: bool
    ) -> tuple[bool, int]:
        """:meth:`_store` of the codec form ``blob``, sealed if encrypted: (stored?, stored size)."""
        await self.check_marker()
        key = self._cipher()
        if key is not None:
            if len(blob) <= _INLINE_LIMIT:
                blob = cipher.seal(key, name, blob)
            else:
                blob = await asyncio.to_thread(cipher.seal, key, name, blob)
        return await self._store(name, blob, trailer, exclusive=exclusive), len(blob)

    async def _write_stream(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        """:meth:`_store_stream` of the codec form in ``chunks``, sealed if encrypted."""
        await self.check_marker()
        key = self._cipher()
        if key is None:
            return await self._store_stream(name, chunks)
        sealer = cipher.Sealer(key, name)

        async def sealed() -> AsyncGenerator[bytes, None]:
            async for chunk in chunks:
                out = await asyncio.to_thread(sealer.update, chunk)
                if out:
                    yield out
            yield await asyncio.to_thread(sealer.finish)

        async with aclosing(sealed()) as stream:
            return await self._store_stream(name, stream)

    async def _read_stream(self, name: str) -> AsyncGenerator[bytes, None]:
        """The codec form of ``name`` in chunks: decrypted and authenticated chunk by chunk if
        encrypted (truncation shows at the end, as the codec's checksum does)."""
        key = self._cipher()
        async with aclosing(self._load_stream(name)) as raw:
            if key is None:
                first = True
                async for chunk in raw:
                    if first and cipher.is_sealed_head(chunk):
                        raise sealed_without_key(self.name, name, chunk[8:24].hex())
                    first = first and not chunk
                    yield chunk
                return
            opener = cipher.Opener(key, name, self.name)
            async for chunk in raw:
                if len(chunk) <= _INLINE_LIMIT:
                    out = opener.feed(chunk)
                else:
                    out = await asyncio.to_thread(opener.feed, chunk)
                if out:
                    yield out
            rest = opener.finish()
            if rest:
                yield rest

    async def _read_tail(self, name: str) -> tuple[bytes, int, datetime]:
        """The last bytes of the codec form of ``name`` (its trailer at the end), the stored
        size and modification time; for a sealed object the authenticated final record."""
        tail, stored, modified = await self._load_tail(name, 4096)
        key = self._cipher()
        if key is None:
            fingerprint = cipher.sealed_tail_fingerprint(tail)
            if fingerprint is not None:
                raise sealed_without_key(self.name, name, fingerprint)
            need = codec.trailer_length(tail)
            if need is not None and need > len(tail) and stored > len(tail):
                tail, stored, modified = await self._load_tail(name, min(need, codec.MAX_TRAILER))
            return tail, stored, modified
        need = cipher.tail_needed(tail)
        if need is not None and need > len(tail) and stored > len(tail):
            tail, stored, modified = await self._load_tail(name, min(need, _MAX_SEALED_TAIL))
        return cipher.open_tail(key, name, self.name, tail), stored, modified

    async def check_marker(self) -> None:
        """Refuse a repository whose :data:`MARKER` disagrees with the configuration (an
        encrypted one configured without a key or with another key; a plain one configured
        with a key), once per instance, before the first write; an encrypted repository
        without a marker gets one.  Plain repositories are not given one: they stay as they
        were, and a plain object met later with a key configured is refused on its own."""
        if self._marker_checked:
            return
        async with self._marker_lock:
            if not self._marker_checked:
                await self._check_marker()
                self._marker_checked = True

    async def ensure_marker(self) -> bool:
        """:meth:`check_marker`, and a marker for a plain repository too (``hakeeper repo
        create``): a key configured later is then refused before its first write rather than at
        the first plain object it meets.  True if this call wrote a plain marker."""
        await self.check_marker()
        if self.encrypted:
            return False
        doc = {"format": 1, "encryption": "none", "key_fingerprint": None}
        blob, trailer = codec.encode(json.dumps(doc, sort_keys=True).encode() + b"\n", {})
        return await self._store(MARKER, blob, trailer, exclusive=True)  # False: check_marker read it

    async def _check_marker(self) -> None:
        key = self._cipher()
        for _ in range(3):
            try:
                parts = [c async for c in self._load_stream(MARKER)]
            except NotFound:
                if key is None:
                    return
                doc = {"format": 1, "encryption": cipher.CIPHER, "key_fingerprint": key.fingerprint_hex}
                blob, trailer = codec.encode(json.dumps(doc, sort_keys=True).encode() + b"\n", {})
                if await self._store(MARKER, blob, trailer, exclusive=True):
                    log.info("repository_marker_written", repo=self.name, key_fingerprint=key.fingerprint_hex)
                    return
                continue  # written by another process meanwhile: check theirs
            try:
                found = json.loads(codec.decode(b"".join(parts), MARKER)[0])
                encryption, fingerprint = str(found["encryption"]), str(found.get("key_fingerprint"))
            except (CorruptObject, ValueError, KeyError, TypeError) as e:
                raise EncryptionMismatch(
                    f"repository {self.name}: {MARKER} is unreadable ({e}); refusing to write until it "
                    "is repaired (it records whether and with which key the repository is encrypted)"
                ) from None
            compare_marker(self.name, key, encryption, fingerprint)
            return
        raise RepoUnavailable(f"{self.name}: {MARKER}: appears and disappears; giving up")


def sealed_without_key(repo: str, name: str, fingerprint: str | None) -> EncryptionMismatch:
    return EncryptionMismatch(
        f"repository {repo}: object {name} is encrypted (key fingerprint {fingerprint or '?'}), "
        "but no encryption key is configured for the repository"
    )


def compare_marker(repo: str, key: cipher.Key | None, encryption: str, fingerprint: str) -> None:
    """Refuse (EncryptionMismatch) a configured key that disagrees with what the marker records."""
    problem = None
    if key is None and encryption != "none":
        problem = f"is encrypted ({encryption}, key fingerprint {fingerprint}) but no key is configured"
    elif key is not None and encryption != cipher.CIPHER:
        problem = f"is not encrypted ({encryption}) but a key is configured; use a new repository"
    elif key is not None and fingerprint != key.fingerprint_hex:
        problem = (
            f"is encrypted with another key (fingerprint {fingerprint}; the configured key's "
            f"fingerprint is {key.fingerprint_hex})"
        )
    if problem is not None:
        log.error("repository_encryption_refused", repo=repo, reason=problem)
        raise EncryptionMismatch(f"repository {repo} {problem} (according to its {MARKER})")


# ====================================================================== filesystem


TMP_MAX_AGE = 3600.0  # a temporary file this old is a crash's leftover (listings remove it)


class FilesystemRepository(Repository):
    """Objects are files below ``path``; writes are atomic and durable (see the module doc).

    Files are created 0600 and directories 0700: the objects are the whole database.  Who must
    read them besides the writer is PostgreSQL's OS user (``restore_command`` fetches WAL
    itself on a replica seeded from a backup), so when this process runs as root, what it
    creates is given the owner and group of the repository's root directory (by descriptor, or
    without following links): make the root belong to PostgreSQL's OS user and everything in it
    does.  Leftover temporary files of a crashed writer are removed by listings once they are
    :data:`TMP_MAX_AGE` old (no writer keeps one open that long without writing).
    """

    kind = "fs"

    def __init__(
        self,
        path: Path | str,
        *,
        name: str = "fs",
        level: int = codec.DEFAULT_LEVEL,
        threads: int = 0,
        offsite: bool = False,
        key: KeySource = None,
    ) -> None:
        super().__init__(name, level=level, threads=threads, offsite=offsite, key=key)
        self.root = Path(path)

    def _owner(self) -> tuple[int, int] | None:
        """The (uid, gid) new files and directories are given: the root directory's, when this
        process runs as root and it belongs to someone else; None: keep our own."""
        if os.geteuid() != 0:
            return None
        st = os.stat(self.root)
        return None if st.st_uid == 0 else (st.st_uid, st.st_gid)

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _error(self, e: OSError, op: str, name: str) -> RepoError:
        if isinstance(e, FileNotFoundError) and self.root.is_dir():
            return NotFound(self.name, name)
        if not self.root.is_dir():
            return RepoUnavailable(f"{self.name}: repository directory {self.root} is missing")
        return RepoUnavailable(f"{self.name}: {op} {name}: {e}")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(self.root)

    def _make_parents(self, directory: Path) -> None:
        """Create missing directories below the root, each made durable in its parent."""
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        owner = self._owner() if missing else None
        for m in reversed(missing):
            try:
                m.mkdir(0o700)
            except FileExistsError:
                pass
            else:
                if owner is not None:
                    os.chown(m, *owner, follow_symlinks=False)
            _fsync_dir(m.parent)

    def _open_temp(self, final: Path) -> tuple[Path, BinaryIO]:
        self._check_root()
        self._make_parents(final.parent)
        tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            owner = self._owner()
            if owner is not None:
                os.fchown(fd, *owner)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, os.fdopen(fd, "wb")

    @staticmethod
    def _commit(tmp: Path, f: BinaryIO, final: Path, exclusive: bool) -> bool:
        """fsync and close ``f``, move ``tmp`` to ``final`` (link: never replaces), fsync the dir."""
        try:
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        try:
            if exclusive:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return True

    def _write_sync(self, name: str, blob: bytes, exclusive: bool) -> bool:
        final = self._path(name)
        tmp, f = self._open_temp(final)
        try:
            f.write(blob)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return self._commit(tmp, f, final, exclusive)

    async def _store(self, name: str, blob: bytes, trailer: codec.Trailer, *, exclusive: bool) -> bool:
        try:
            return await asyncio.to_thread(self._write_sync, name, blob, exclusive)
        except OSError as e:
            raise self._error(e, "write", name) from e

    async def _store_stream(self, name: str, chunks: AsyncIterator[bytes]) -> int:
        final = self._path(name)
        try:
            tmp, f = await asyncio.to_thread(self._open_temp, final)
        except OSError as e:
            raise self._error(e, "write", name) from e
        size = 0
        try:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
                size += len(chunk)
            await asyncio.to_thread(self._commit, tmp, f, final, False)
        except OSError as e:
            raise self._error(e, "write", name) from e
        finally:
            if not f.closed:
                f.close()
            if tmp.exists():
                tmp.unlink(missing_ok=True)
        return size

    async def _load_stream(self, name: str) -> AsyncGenerator[bytes, None]:
        path = self._path(name)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError as e:
            raise self._error(e, "read", name) from e
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(f.read, CHUNK)
                except OSError as e:
                    raise self._error(e, "read", name) from e
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    def _tail_sync(self, name: str, length: int) -> tuple[bytes, int, datetime]:
        with open(self._path(name), "rb") as f:
            st = os.fstat(f.fileno())
            f.seek(max(0, st.st_size - length))
            return f.read(length), st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)

    async def _load_tail(self, name: str, length: int) -> tuple[bytes, int, datetime]:
        try:
            return await asyncio.to_thread(self._tail_sync, name, length)
        except OSError as e:
            raise self._error(e, "stat", name) from e

    def _list_sync(self, prefix: str) -> list[ListEntry]:
        self._check_root()
        start = self.root / prefix.rpartition("/")[0]
        out: list[ListEntry] = []
        stale = datetime.now(UTC).timestamp() - TMP_MAX_AGE
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith("."):
                    if fn.endswith(".tmp"):
                        self._remove_stale(Path(dirpath) / fn, stale)
                    continue
                p = Path(dirpath) / fn
                rel = p.relative_to(self.root).as_posix()
                if not rel.startswith(prefix):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue  # deleted while listing
                out.append(ListEntry(rel, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return sorted(out, key=lambda e: e.name)

    def _remove_stale(self, tmp: Path, before: float) -> None:
        try:
            if tmp.lstat().st_mtime < before:
                tmp.unlink()
                log.warning("repository_tmp_removed", repo=self.name, file=str(tmp), reason="1 h old")
        except OSError:
            pass  # gone meanwhile, or not ours to remove: the next listing tries again

    async def list_objects(self, prefix: str = "") -> list[ListEntry]:
        try:
            return await asyncio.to_thread(self._list_sync, prefix)
        except OSError as e:
            raise self._error(e, "list", prefix) from e

    def _delete_sync(self, name: str) -> None:
        self._check_root()
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    async def delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(self._delete_sync, name)
        except OSError as e:
            raise self._error(e, "delete", name) from e

    async def initialize(self) -> None:
        await asyncio.to_thread(self.root.mkdir, 0o700, parents=True, exist_ok=True)
