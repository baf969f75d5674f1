"""The stored form of a repository object: zstd-compressed content, then a checksum trailer.

Layout (the same on every repository type)::

    zstd frame (content checksum on) | skippable frame: JSON, u32 JSON length, u32 CRC-32 of JSON, marker

The trailer is a zstd *skippable frame* (magic 0x184D2A5E), so a stored object is still a valid
``.zst`` file that ``zstd -d`` decompresses.  It sits at the end, not the start, so that content
can be streamed in and the checksum written once it is known.  The JSON holds the format
version, codec, the *uncompressed* size and SHA-256, and the caller's metadata.  A reader finds
it from the last 16 bytes (length, CRC, marker), decompresses everything before it and checks size
and SHA-256: any mismatch, a missing trailer or a zstd error is :class:`CorruptObject`.

Content that is already compressed (the slices of a zstd stream that PostgreSQL compressed
itself, see :mod:`hakeeper.backup.basebackup`) is stored as is, without a second compression::

    skippable frame: "HKRAW" head | content | skippable frame: trailer (codec "none")

The head tells a streaming reader, from the first bytes, that the content follows unchanged;
size and SHA-256 in the trailer are those of the content (the bytes as given).

The functions here are synchronous and CPU-bound; the repositories call them in a worker
thread for anything but small data (zstd and hashlib release the GIL).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import zstandard

from hakeeper.backup.errors import CorruptObject

CODEC = "zstd"
CODEC_NONE = "none"  # content stored as given (already compressed)
_CODECS = (CODEC, CODEC_NONE)
FORMAT_VERSION = 1
DEFAULT_LEVEL = 3
MAX_TRAILER = 64 * 1024  # a trailer is never longer; readers fetch at most this much of the tail
_SKIPPABLE_MAGIC = 0x184D2A5E
_MARKER = b"HKOBJ\x00v1"
_RAW_PAYLOAD = b"HKRAW\x00v1"
_FRAME_HEAD = struct.Struct("<II")  # skippable magic, frame size
_TAIL = struct.Struct("<II8s")  # JSON length, CRC-32 of the JSON, marker
RAW_HEAD = _FRAME_HEAD.pack(_SKIPPABLE_MAGIC, len(_RAW_PAYLOAD)) + _RAW_PAYLOAD
_META_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_MAX_META = 16


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """Caller metadata must also fit S3 user metadata: few, short, lower-case keys, ASCII values."""
    if len(meta) > _MAX_META:
        raise ValueError(f"at most {_MAX_META} metadata entries")
    out: dict[str, str] = {}
    for k, v in meta.items():
        if not _META_KEY.match(k):
            raise ValueError(f"metadata key {k!r} must match {_META_KEY.pattern}")
        if not isinstance(v, str) or len(v) > 256 or not v.isascii() or not v.isprintable():
            raise ValueError(f"metadata value of {k!r} must be printable ASCII, at most 256 characters")
        out[k] = v
    return out


@dataclass(frozen=True, slots=True)
class Trailer:
    """What an object's trailer records about its uncompressed content."""

    size: int
    sha256: str
    meta: Mapping[str, str] = field(default_factory=dict)
    codec: str = CODEC

    def to_bytes(self) -> bytes:
        doc = {
            "v": FORMAT_VERSION,
            "codec": self.codec,
            "size": self.size,
            "sha256": self.sha256,
            "meta": dict(self.meta),
        }
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        payload = body + _TAIL.pack(len(body), zlib.crc32(body), _MARKER)
        out = _FRAME_HEAD.pack(_SKIPPABLE_MAGIC, len(payload)) + payload
        if len(out) > MAX_TRAILER:
            raise ValueError("object metadata too large")
        return out


def trailer_length(tail: bytes) -> int | None:
    """The trailer length the last bytes of an object announce (None: no trailer marker)."""
    if len(tail) < _TAIL.size:
        return None
    json_len, _, marker = _TAIL.unpack_from(tail, len(tail) - _TAIL.size)
    return _FRAME_HEAD.size + json_len + _TAIL.size if marker == _MARKER else None


def parse_trailer(tail: bytes, name: str) -> tuple[int, Trailer]:
    """The trailer at the end of ``tail`` (the object's last bytes, up to :data:`MAX_TRAILER`)
    and its length in bytes."""
    if len(tail) < _FRAME_HEAD.size + _TAIL.size:
        raise CorruptObject(name, "too short to hold a trailer")
    json_len, crc, marker = _TAIL.unpack_from(tail, len(tail) - _TAIL.size)
    if marker != _MARKER:
        raise CorruptObject(name, "no trailer (marker missing)")
    total = _FRAME_HEAD.size + json_len + _TAIL.size
    if total > len(tail):
        raise CorruptObject(name, "trailer length out of range")
    start = len(tail) - total
    magic, frame_size = _FRAME_HEAD.unpack_from(tail, start)
    if magic != _SKIPPABLE_MAGIC or frame_size != json_len + _TAIL.size:
        raise CorruptObject(name, "trailer frame header damaged")
    body = tail[start + _FRAME_HEAD.size : start + _FRAME_HEAD.size + json_len]
    if zlib.crc32(body) != crc:
        raise CorruptObject(name, "trailer checksum mismatch")
    try:
        doc = json.loads(body)
        if doc["v"] != FORMAT_VERSION or doc["codec"] not in _CODECS:
            raise CorruptObject(name, f"unknown format {doc['v']!r}/{doc['codec']!r}")
        size, sha, meta = doc["size"], doc["sha256"], doc["meta"]
        if not (isinstance(size, int) and isinstance(sha, str) and isinstance(meta, dict)):
            raise TypeError("field types")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptObject(name, f"trailer unreadable: {e}") from e
    meta = {str(k): str(v) for k, v in meta.items()}
    return total, Trailer(size=size, sha256=sha, meta=meta, codec=str(doc["codec"]))


class Encoder:
    """Streaming compression: ``update()`` per chunk, then ``finish()`` for the rest + trailer."""

    def __init__(self, level: int = DEFAULT_LEVEL, threads: int = 0) -> None:
        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self._cobj = cctx.compressobj()
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> bytes:
        self._sha.update(chunk)
        self.size += len(chunk)
        return self._cobj.compress(chunk)

    def finish(self, meta: Mapping[str, str]) -> tuple[bytes, Trailer]:
        trailer = Trailer(size=self.size, sha256=self._sha.hexdigest(), meta=dict(meta))
        return self._cobj.flush() + trailer.to_bytes(), trailer


def encode(
    data: bytes, meta: Mapping[str, str], level: int = DEFAULT_LEVEL, threads: int = 0
) -> tuple[bytes, Trailer]:
    """The stored form of ``data`` (one call; for a 16 MiB segment run it in a thread)."""
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    trailer = Trailer(size=len(data), sha256=sha256_hex(data), meta=dict(meta))
    return cctx.compress(data) + trailer.to_bytes(), trailer


def encode_raw(data: bytes, meta: Mapping[str, str]) -> tuple[bytes, Trailer]:
    """The stored form of already compressed ``data``: kept as is (see the module doc)."""
    trailer = Trailer(size=len(data), sha256=sha256_hex(data), meta=dict(meta), codec=CODEC_NONE)
    return RAW_HEAD + data + trailer.to_bytes(), trailer


class RawEncoder:
    """Streaming form of :func:`encode_raw` (same interface as :class:`Encoder`): the content
    passes as it is and is checksummed on the way; ``finish()`` gives the trailer."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> bytes:
        self._sha.update(chunk)
        first = self.size == 0 and bool(chunk)
        self.size += len(chunk)
        return RAW_HEAD + chunk if first else chunk

    def finish(self, meta: Mapping[str, str]) -> tuple[bytes, Trailer]:
        trailer = Trailer(size=self.size, sha256=self._sha.hexdigest(), meta=dict(meta), codec=CODEC_NONE)
        return (b"" if self.size else RAW_HEAD) + trailer.to_bytes(), trailer


class Decoder:
    """Streaming decompression and verification of a stored object, trailer included.

    ``feed()`` returns content as it becomes available, holding back the last
    :data:`MAX_TRAILER` bytes (they may be the trailer); ``finish()`` returns the rest and the
    trailer, or raises :class:`CorruptObject`.  Content already returned is only trustworthy
    once ``finish()`` has succeeded.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._held = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0
        self._raw: bool | None = None  # known once the first bytes are in

    def _decompress(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._raw:
            self._sha.update(data)
            self._size += len(data)
            return data
        if self._dobj.eof:
            raise CorruptObject(self.name, "data after the end of the zstd frame")
        try:
            out = self._dobj.decompress(data)
        except zstandard.ZstdError as e:
            raise CorruptObject(self.name, f"zstd: {e}") from e
        if self._dobj.unused_data:
            raise CorruptObject(self.name, "data after the end of the zstd frame")
        self._sha.update(out)
        self._size += len(out)
        return out

    def _sniff(self) -> None:
        if self._raw is None and len(self._held) >= len(RAW_HEAD):
            self._raw = self._held.startswith(RAW_HEAD)
            if self._raw:
                del self._held[: len(RAW_HEAD)]

    def feed(self, chunk: bytes) -> bytes:
        self._held += chunk
        self._sniff()
        if len(self._held) <= MAX_TRAILER or self._raw is None:
            return b""
        cut = len(self._held) - MAX_TRAILER
        data = bytes(self._held[:cut])
        del self._held[:cut]
        return self._decompress(data)

    def finish(self) -> tuple[bytes, Trailer]:
        self._sniff()
        total, trailer = parse_trailer(bytes(self._held), self.name)
        if bool(self._raw) != (trailer.codec == CODEC_NONE):
            raise CorruptObject(self.name, f"head and trailer disagree on the codec ({trailer.codec})")
        out = self._decompress(bytes(self._held[: len(self._held) - total]))
        self._held.clear()
        if not self._raw and not self._dobj.eof:
            raise CorruptObject(self.name, "zstd frame truncated")
        if self._size != trailer.size:
            raise CorruptObject(self.name, f"size {self._size} != recorded {trailer.size}")
        if self._sha.hexdigest() != trailer.sha256:
            raise CorruptObject(self.name, "sha256 of the content does not match the recorded one")
        return out, trailer


def decode(blob: bytes, name: str) -> tuple[bytes, Trailer]:
    """Content and trailer of a whole stored object, verified."""
    if blob.startswith(RAW_HEAD):  # stored as is: no copy through the streaming decoder
        total, trailer = parse_trailer(blob[-MAX_TRAILER:], name)
        if trailer.codec != CODEC_NONE:
            raise CorruptObject(name, f"head and trailer disagree on the codec ({trailer.codec})")
        content = blob[len(RAW_HEAD) : len(blob) - total]
        if len(content) != trailer.size:
            raise CorruptObject(name, f"size {len(content)} != recorded {trailer.size}")
        if sha256_hex(content) != trailer.sha256:
            raise CorruptObject(name, "sha256 of the content does not match the recorded one")
        return content, trailer
    dec = Decoder(name)
    head = dec.feed(blob)
    rest, trailer = dec.finish()
    return head + rest, trailer
