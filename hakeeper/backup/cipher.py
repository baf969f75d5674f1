"""Client-side authenticated encryption of repository objects (issue 12, finding 7).

A repository configured with ``encryption`` seals every object it stores -- base backup parts,
WAL, dumps, records, manifests -- in this format, below the codec (:mod:`hakeeper.backup.codec`):
what is sealed is the codec's stored form (zstd content + checksum trailer), so compression
still works (compressing ciphertext would not) and nothing about the content is visible.

AES-256-GCM (``cryptography``'s ``AESGCM``), in a chunked streaming layout, so an object of any
size is written and read in bounded memory::

    header   "HKENC\\0" | version u8 | 0 u8 | key fingerprint (16) | salt (32)            56 bytes
    records  flag u8 (1: final) | plaintext length u32 | ciphertext | GCM tag (16)      one per chunk
    footer   header again | final record's index u64 | final record's size u32 | "HKENCEND"

* **Per-object key**: HKDF-SHA256 of the master key with the object's random 32-byte salt
  gives a fresh AES key and a 4-byte nonce prefix for each object, so the nonce space (prefix +
  64-bit record counter) belongs to one object and never repeats under a key.
* **Associated data** of record *i*: the header, *i*, the final flag and the object's name.  A
  reordered, dropped or duplicated record, a record from another object, an object renamed or
  copied to another name (two WAL segments swapped), a flipped "final" flag, a truncated object
  (no final record): each fails authentication.
* **Key fingerprint**: HKDF of the master key with a fixed label (not the key, not a hash
  an attacker could test guesses against faster than AES).  It tells "sealed with another key"
  (:class:`WrongKey`) apart from "altered" (:class:`AuthenticationFailed`).
* **Final record = the codec trailer**: the writer holds back the codec's trailer (size,
  SHA-256, metadata) and seals it alone as the final record; the footer says where that record
  starts, so ``stat`` reads and authenticates only the tail of an object, as for a plain one.
  The footer itself is not secret; everything in it is checked against the authenticated data.

Records hold at most :data:`CHUNK` bytes of plaintext; a reader refuses longer ones before
allocating anything.  Functions here are synchronous and CPU-bound (AES-GCM runs at GB/s with
AES-NI and releases the GIL): the repositories call them in a worker thread for large data.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hakeeper.backup import codec
from hakeeper.backup.errors import AuthenticationFailed, CorruptObject, EncryptionMismatch, WrongKey
from hakeeper.util.keyfile import KEY_BYTES

CIPHER = "aes-256-gcm"
VERSION = 1
CHUNK = 1 << 20  # plaintext bytes per record
MAGIC = b"HKENC\x00"
END_MAGIC = b"HKENCEND"
SALT_BYTES = 32
FINGERPRINT_BYTES = 16
TAG_BYTES = 16
_HEADER = struct.Struct(f"<6sBB{FINGERPRINT_BYTES}s{SALT_BYTES}s")
_RECORD = struct.Struct(">BI")  # final flag, plaintext length
_FOOTER_TAIL = struct.Struct(">QI8s")  # final index, final record size, END_MAGIC
HEADER_LEN = _HEADER.size
FOOTER_LEN = HEADER_LEN + _FOOTER_TAIL.size
_FINGERPRINT_INFO = b"hakeeper repository key fingerprint v1"
_OBJECT_INFO = b"hakeeper repository object key v1"


def _hkdf(master: bytes, length: int, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(master)


@dataclass(frozen=True, slots=True)
class Key:
    """A repository's master key and its fingerprint (the key never appears in a repr)."""

    master: bytes = field(repr=False)
    fingerprint: bytes = b""

    @classmethod
    def from_bytes(cls, master: bytes) -> Key:
        if len(master) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes, not {len(master)}")
        return cls(master, _hkdf(master, FINGERPRINT_BYTES, None, _FINGERPRINT_INFO))

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


@dataclass(frozen=True, slots=True)
class _Header:
    fingerprint: bytes
    salt: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, 0, self.fingerprint, self.salt)


class _Sealed:
    """The per-object cipher state shared by :class:`Sealer` and :class:`Opener`."""

    def __init__(self, key: Key, name: str, header: _Header) -> None:
        okm = _hkdf(key.master, 32 + 4, header.salt, _OBJECT_INFO)
        self._aead = AESGCM(okm[:32])
        self._prefix = okm[32:]
        self._header = header.pack()
        self._name = name.encode()

    def _nonce_aad(self, index: int, final: bool) -> tuple[bytes, bytes]:
        nonce = self._prefix + index.to_bytes(8, "big")
        return nonce, self._header + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00") + self._name

    def seal(self, index: int, final: bool, plain: bytes) -> bytes:
        nonce, aad = self._nonce_aad(index, final)
        return _RECORD.pack(1 if final else 0, len(plain)) + self._aead.encrypt(nonce, plain, aad)

    def open(self, index: int, final: bool, sealed: bytes) -> bytes | None:
        nonce, aad = self._nonce_aad(index, final)
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            return None


def _footer(header: bytes, final_index: int, final_size: int) -> bytes:
    return header + _FOOTER_TAIL.pack(final_index, final_size, END_MAGIC)


class Sealer:
    """Streaming encryption of one object: ``update()`` per piece, then ``finish()``.

    The last :data:`codec.MAX_TRAILER` bytes are held back until the end, so the codec trailer
    can be sealed alone as the final record (see the module doc)."""

    def __init__(self, key: Key, name: str, *, salt: bytes | None = None) -> None:
        header = _Header(key.fingerprint, salt if salt is not None else secrets.token_bytes(SALT_BYTES))
        self._state = _Sealed(key, name, header)
        self._header = header.pack()
        self._held = bytearray()
        self._index = 0
        self._started = False
        self.size = 0  # sealed bytes returned so far

    def _emit(self, parts: list[bytes]) -> bytes:
        if not self._started:
            parts.insert(0, self._header)
            self._started = True
        out = b"".join(parts)
        self.size += len(out)
        return out

    def _record(self, plain: bytes, final: bool) -> bytes:
        rec = self._state.seal(self._index, final, plain)
        self._index += 1
        return rec

    def update(self, data: bytes) -> bytes:
        self._held += data
        parts: list[bytes] = []
        while len(self._held) >= CHUNK + codec.MAX_TRAILER:
            parts.append(self._record(bytes(self._held[:CHUNK]), False))
            del self._held[:CHUNK]
        return self._emit(parts) if parts or not self._started else b""

    def finish(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        tlen = codec.trailer_length(held[-codec.MAX_TRAILER :])
        if tlen is None or tlen > len(held):
            tlen = min(len(held), CHUNK)  # not a codec object (tests, tools): the last chunk
        body, final = held[: len(held) - tlen], held[len(held) - tlen :]
        parts = [self._record(body[i : i + CHUNK], False) for i in range(0, len(body), CHUNK)]
        last = self._record(final, True)
        parts.append(last)
        parts.append(_footer(self._header, self._index - 1, len(last)))
        return self._emit(parts)


def seal(key: Key, name: str, data: bytes) -> bytes:
    """The sealed form of ``data`` stored as ``name`` (one call)."""
    s = Sealer(key, name)
    return s.update(data) + s.finish()


def _plain_object(repo: str, name: str) -> EncryptionMismatch:
    return EncryptionMismatch(
        f"repository {repo}: object {name} is not encrypted, but the repository is configured "
        "with an encryption key (a plain repository, or an object written without the key)"
    )


def _parse_header(raw: bytes, key: Key, repo: str, name: str) -> _Header:
    magic, version, _, fingerprint, salt = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise _plain_object(repo, name)
    if version != VERSION:
        raise CorruptObject(name, f"unknown encryption format version {version}")
    if fingerprint != key.fingerprint:
        raise WrongKey(repo, name, fingerprint.hex(), key.fingerprint_hex)
    return _Header(fingerprint, salt)


class Opener:
    """Streaming decryption and authentication of one sealed object.

    ``feed()`` returns plaintext of each record as soon as it is authenticated; ``finish()``
    checks that the final record and the footer came (else the object was truncated).  As with
    the codec's decoder, plaintext returned before ``finish()`` succeeded is authentic but may
    be incomplete."""

    def __init__(self, key: Key, name: str, repo: str) -> None:
        self._key = key
        self._name = name
        self._repo = repo
        self._buf = bytearray()
        self._state: _Sealed | None = None
        self._header = b""
        self._index = 0
        self._final_size: int | None = None

    def _fail(self, detail: str) -> AuthenticationFailed:
        why = "the object was altered, truncated or stored under another name"
        return AuthenticationFailed(self._repo, self._name, f"{detail} ({why})")

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        if self._state is None:
            if len(self._buf) < HEADER_LEN:
                if not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                    raise _plain_object(self._repo, self._name)
                return b""
            self._header = bytes(self._buf[:HEADER_LEN])
            header = _parse_header(self._header, self._key, self._repo, self._name)
            self._state = _Sealed(self._key, self._name, header)
            del self._buf[:HEADER_LEN]
        out: list[bytes] = []
        while self._final_size is None and len(self._buf) >= _RECORD.size:
            flag, length = _RECORD.unpack_from(self._buf)
            if flag > 1 or length > CHUNK:
                raise self._fail(f"record {self._index} header damaged")
            total = _RECORD.size + length + TAG_BYTES
            if len(self._buf) < total:
                break
            plain = self._state.open(self._index, flag == 1, bytes(self._buf[_RECORD.size : total]))
            if plain is None:
                raise self._fail(f"record {self._index}")
            del self._buf[:total]
            out.append(plain)
            if flag == 1:
                self._final_size = total
            else:
                self._index += 1
        if self._final_size is not None and len(self._buf) > FOOTER_LEN:
            raise self._fail("data after the final record")
        return b"".join(out)

    def finish(self) -> bytes:
        rest = self.feed(b"")
        if self._state is None:
            if not self._buf:
                raise CorruptObject(self._name, "empty object")
            raise self._fail("truncated in the header")
        if self._final_size is None:
            raise self._fail(f"truncated after record {self._index - 1} (no final record)")
        if bytes(self._buf) != _footer(self._header, self._index, self._final_size):
            raise self._fail("footer damaged or missing")
        return rest


def open_sealed(key: Key, name: str, repo: str, blob: bytes) -> bytes:
    """The plaintext of a whole sealed object, authenticated."""
    o = Opener(key, name, repo)
    head = o.feed(blob)
    return head + o.finish()


def is_sealed_head(head: bytes) -> bool:
    """Whether an object's first bytes are those of a sealed object."""
    return head.startswith(MAGIC)


def sealed_tail_fingerprint(tail: bytes) -> str | None:
    """The key fingerprint an object's last bytes name, if they are a sealed object's footer."""
    if len(tail) < FOOTER_LEN or not tail.endswith(END_MAGIC):
        return None
    magic, _, _, fingerprint, _ = _HEADER.unpack_from(tail, len(tail) - FOOTER_LEN)
    return fingerprint.hex() if magic == MAGIC else None


def tail_needed(tail: bytes) -> int | None:
    """How many of an object's last bytes :func:`open_tail` needs (None: no footer there)."""
    if len(tail) < FOOTER_LEN or not tail.endswith(END_MAGIC):
        return None
    _, size, _ = _FOOTER_TAIL.unpack_from(tail, len(tail) - _FOOTER_TAIL.size)
    return int(FOOTER_LEN + size)


def open_tail(key: Key, name: str, repo: str, tail: bytes) -> bytes:
    """The authenticated plaintext of the final record (the codec trailer), from the object's
    last bytes (at least :func:`tail_needed` of them)."""
    need = tail_needed(tail)
    if need is None:
        if codec.trailer_length(tail) is not None:  # a codec trailer, in the clear
            raise _plain_object(repo, name)
        raise AuthenticationFailed(repo, name, "no footer (the object was truncated or is not sealed)")
    if need > len(tail):
        raise AuthenticationFailed(repo, name, "footer points before the object's start")
    footer = tail[len(tail) - FOOTER_LEN :]
    header = _parse_header(footer[:HEADER_LEN], key, repo, name)
    index, _, _ = _FOOTER_TAIL.unpack_from(footer, HEADER_LEN)
    record = tail[len(tail) - need : len(tail) - FOOTER_LEN]
    flag, length = _RECORD.unpack_from(record)
    if flag != 1 or len(record) != _RECORD.size + length + TAG_BYTES:
        raise AuthenticationFailed(repo, name, "final record damaged")
    plain = _Sealed(key, name, header).open(index, True, record[_RECORD.size :])
    if plain is None:
        raise AuthenticationFailed(
            repo, name, "final record (the object was altered, truncated or stored under another name)"
        )
    return plain
