"""The file index of an indexed base backup (layout ``zstd-indexed``): what restores it in parallel
and by delta.

While pg_basebackup's tar stream passes, :class:`IndexBuilder` records every member -- path,
kind (file, directory, symbolic link), mode, size, link target and the offset of its data in the
*uncompressed* stream -- and, per regular file, an xxh3-128 hash of every block of
``block_size`` bytes (aligned to file offsets; the last one shorter).  The stream itself is
stored in parts, each an independent zstd frame whose uncompressed size the index holds
(``part_sizes``), so the stream offset of every part is known: any worker can fetch one part,
decompress it and write each member slice it overlaps at the right file offset, without
reading the parts before it (:mod:`hakeeper.backup.unpack`).

The block hashes serve delta restore (:mod:`hakeeper.backup.delta`) only: they say which blocks
of an older local copy differ.  Integrity is the parts' and the index's own SHA-256 (checked by
the repository on every read).  The index comes from the repository, which may have been
tampered with, so :func:`parse_index` refuses anything a honest backup cannot produce: paths
leaving the data directory, members overlapping each other or the end of the stream, a hash
count that does not fit the size, entries below a symbolic link.

Pure: no I/O here.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_BLOCK_SIZE = 1 << 12
MAX_BLOCK_SIZE = 1 << 26
HASH_LEN = 16  # xxh3-128
KIND_FILE = "f"
KIND_DIR = "d"
KIND_LINK = "l"
_KINDS = (KIND_FILE, KIND_DIR, KIND_LINK)
CONTROL_FILE = "global/pg_control"
# what a restore records in the data directory (backup/restorestate.py): a backup of a restored
# cluster holds one, which a restore replaces with its own (or removes) when it ends
STATE_FILE = "hakeeper-restore-state.json"
MAX_MEMBERS = 10_000_000


class BadIndex(ValueError):
    """An index that cannot be built or trusted; the message says why."""


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The hash of one block, as the index records it."""
    return xxhash.xxh3_128_digest(data)


def block_count(size: int, block_size: int) -> int:
    return math.ceil(size / block_size) if size > 0 else 0


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of the tar stream.  ``offset``: where a file's data starts in the uncompressed
    stream (0 for directories and links); ``blocks``: a file's block hashes."""

    path: str
    kind: str
    mode: int
    size: int = 0
    offset: int = 0
    link: str | None = None
    blocks: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class FileIndex:
    block_size: int
    stream_size: int
    members: tuple[Member, ...]
    # the uncompressed size of every part, in order (the parts are stored compressed, as is)
    part_sizes: tuple[int, ...] = ()

    def files(self) -> Iterator[Member]:
        return (m for m in self.members if m.kind == KIND_FILE)

    def by_path(self) -> dict[str, Member]:
        return {m.path: m for m in self.members}

    @property
    def data_bytes(self) -> int:
        return sum(m.size for m in self.files())


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes of file ``path`` at ``file_offset``, found at ``stream_offset`` of the
    uncompressed tar stream."""

    path: str
    file_offset: int
    stream_offset: int
    length: int

    @property
    def stream_end(self) -> int:
        return self.stream_offset + self.length


# ============================================================================ serialisation


def to_bytes(index: FileIndex) -> bytes:
    """Compact JSON (the repository compresses it): one array per member, the block hashes of a
    file as one hex string."""
    rows: list[list[object]] = []
    for m in index.members:
        row: list[object] = [m.path, m.kind, m.mode]
        if m.kind == KIND_FILE:
            row += [m.size, m.offset, b"".join(m.blocks).hex()]
        elif m.kind == KIND_LINK:
            row += [m.link or ""]
        rows.append(row)
    doc = {
        "format": INDEX_FORMAT,
        "block_size": index.block_size,
        "hash": "xxh3-128",
        "stream_size": index.stream_size,
        "part_sizes": list(index.part_sizes),
        "members": rows,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadIndex(f"{what} is not a non-negative integer")
    return v


def _safe_path(p: object) -> str:
    if not isinstance(p, str) or not p or len(p) > 4096:
        raise BadIndex(f"member path {p!r} is not a usable path")
    parts = p.split("/")
    if p.startswith("/") or "\0" in p or any(c in ("", ".", "..") for c in parts):
        raise BadIndex(f"member path {p!r} leaves the data directory or is not normalised")
    return p


def parse_index(raw: bytes, parts: int) -> FileIndex:
    """The index of a backup of ``parts`` parts, checked to be one a backup can have written
    (BadIndex otherwise)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise BadIndex(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadIndex("not a JSON object")
    if doc.get("format") != INDEX_FORMAT:
        raise BadIndex(f"format {doc.get('format')!r} is not {INDEX_FORMAT} (a newer hakeeper wrote it?)")
    if doc.get("hash") != "xxh3-128":
        raise BadIndex(f"block hash {doc.get('hash')!r} is not xxh3-128")
    bs = _int(doc.get("block_size"), "block_size")
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise BadIndex(f"block_size {bs} is not a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
    stream_size = _int(doc.get("stream_size"), "stream_size")
    sizes = doc.get("part_sizes")
    if not isinstance(sizes, list) or len(sizes) != parts:
        raise BadIndex(f"part_sizes is not a list of the backup's {parts} part sizes")
    part_sizes = tuple(_int(v, "a part size") for v in sizes)
    if stream_size != sum(part_sizes):
        raise BadIndex(f"stream_size {stream_size} is not the parts' total {sum(part_sizes)}")
    rows = doc.get("members")
    if not isinstance(rows, list) or len(rows) > MAX_MEMBERS:
        raise BadIndex("members is not a list of a sane length")
    members: list[Member] = []
    kinds: dict[str, str] = {}
    end = 0  # file data is in stream order and never overlaps
    for row in rows:
        m = _parse_row(row, kinds, bs, stream_size, end)
        if m.kind == KIND_FILE:
            end = m.offset + m.size
        members.append(m)
    return FileIndex(block_size=bs, stream_size=stream_size, members=tuple(members), part_sizes=part_sizes)


def _parse_row(row: object, kinds: dict[str, str], bs: int, stream_size: int, end: int) -> Member:
    """One member of the index, checked against those before it (``kinds``, updated; ``end``:
    where the previous file's data ended)."""
    if not isinstance(row, list) or len(row) < 3:
        raise BadIndex(f"member {row!r} is not [path, kind, mode, ...]")
    path = _safe_path(row[0])
    kind = row[1]
    if kind not in _KINDS:
        raise BadIndex(f"{path}: kind {kind!r} is not one of {_KINDS}")
    mode = _int(row[2], f"{path}: mode")
    if mode & ~0o777:  # PostgreSQL's files are never setuid, setgid or sticky
        raise BadIndex(f"{path}: mode {mode:o} has bits beyond read/write/execute")
    if path in kinds:
        raise BadIndex(f"{path} is listed twice")
    parent = path.rpartition("/")[0]
    if parent and kinds.get(parent) != KIND_DIR:
        raise BadIndex(f"{path}: its parent {parent} is not a directory listed before it")
    kinds[path] = kind
    if kind == KIND_DIR:
        if len(row) != 3:
            raise BadIndex(f"{path}: a directory has no size or data")
        return Member(path, kind, mode)
    if kind == KIND_LINK:
        if len(row) != 4 or not isinstance(row[3], str) or not row[3] or "\0" in row[3]:
            raise BadIndex(f"{path}: a symbolic link needs a target")
        return Member(path, kind, mode, link=row[3])
    if len(row) != 6 or not isinstance(row[5], str):
        raise BadIndex(f"{path}: a file needs size, offset and block hashes")
    size = _int(row[3], f"{path}: size")
    offset = _int(row[4], f"{path}: offset")
    if offset % 512 or offset < end or offset + size > stream_size:
        raise BadIndex(f"{path}: data at {offset}+{size} is not after the previous member within the stream")
    try:
        hashes = bytes.fromhex(row[5])
    except ValueError:
        raise BadIndex(f"{path}: block hashes are not hex") from None
    n = block_count(size, bs)
    if len(hashes) != n * HASH_LEN:
        raise BadIndex(f"{path}: {len(hashes) // HASH_LEN} block hashes for {n} blocks")
    blocks = tuple(hashes[i * HASH_LEN : (i + 1) * HASH_LEN] for i in range(n))
    return Member(path, kind, mode, size=size, offset=offset, blocks=blocks)


# ============================================================================ building


def tar_number(field_: bytes) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        n = field_[0] & 0x7F
        for b in field_[1:]:
            n = (n << 8) | b
        return n
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def tar_checksum_ok(hdr: bytes) -> bool:
    try:
        want = tar_number(hdr[148:156])
    except ValueError:
        return False
    return want == sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])


def _pax_records(body: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    i = 0
    while i < len(body):
        sp = body.find(b" ", i)
        if sp < 0:
            raise BadIndex("malformed pax header")
        n = int(body[i:sp])
        if n <= 0 or i + n > len(body):
            raise BadIndex("malformed pax record length")
        rec = body[sp + 1 : i + n].rstrip(b"\n")
        k, _, v = rec.partition(b"=")
        out[k.decode()] = v.decode("utf-8", errors="surrogateescape")
        i += n
    return out


_FILE_TYPES = (b"0", b"\0", b"7")
_MAX_META_BODY = 1 << 20  # a long name or pax header is never that large


@dataclass
class IndexBuilder:
    """Follows a tar stream fed in arbitrary pieces and builds its :class:`FileIndex`: tracks
    the absolute offset of every member's data and hashes every file block as it passes
    (nothing of the stream is kept but long-name and pax header bodies)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    members: list[Member] = field(default_factory=list)
    offset: int = 0  # bytes of the stream consumed
    ended: bool = False
    _hdr: bytearray = field(default_factory=bytearray)
    _zero_blocks: int = 0
    _body_left: int = 0  # data bytes of the current member still to come
    _pad_left: int = 0  # padding after it
    _meta: bytearray | None = None  # body of a long-name / pax header being collected
    _meta_kind: bytes = b""
    _next_name: str | None = None
    _next_link: str | None = None
    _next_size: int | None = None
    _file: Member | None = None  # the regular file whose data is passing
    _hasher: xxhash.xxh3_128 | None = None
    _block_left: int = 0
    _file_left_after_block: int = 0
    _digests: list[bytes] = field(default_factory=list)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._body_left:
                take = min(self._body_left, n - i)
                self._body(view[i : i + take])
                self._body_left -= take
                i += take
                self.offset += take
                if self._body_left == 0:
                    self._end_body()
                continue
            if self._pad_left:
                take = min(self._pad_left, n - i)
                self._pad_left -= take
                i += take
                self.offset += take
                continue
            take = min(512 - len(self._hdr), n - i)
            self._hdr += view[i : i + take]
            i += take
            self.offset += take
            if len(self._hdr) == 512:
                hdr = bytes(self._hdr)
                self._hdr.clear()
                self._header(hdr)

    def _header(self, hdr: bytes) -> None:
        if hdr.count(0) == 512:
            self._zero_blocks += 1
            if self._zero_blocks >= 2:
                self.ended = True
            return
        if self.ended or self._zero_blocks:
            raise BadIndex(f"tar data after an end-of-archive block at {self.offset}")
        if not tar_checksum_ok(hdr):
            raise BadIndex(f"bad tar header checksum at offset {self.offset - 512}")
        name = hdr[:100].split(b"\0", 1)[0].decode(errors="surrogateescape")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode(errors="surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        size = tar_number(hdr[124:136])
        kind = hdr[156:157]
        if kind in (b"L", b"K", b"x"):  # GNU long name / long link name, pax header
            if size > _MAX_META_BODY:
                raise BadIndex(f"a {kind.decode()} header body of {size} bytes")
            self._meta, self._meta_kind = bytearray(), kind
            self._start_body(size)
            return
        if kind == b"g":  # pax global header: nothing PostgreSQL writes that matters here
            self._start_body(size)
            return
        self._member(hdr, name, size, kind)

    def _member(self, hdr: bytes, name: str, size: int, kind: bytes) -> None:
        """A member's header (after any long-name or pax header that named it)."""
        if self._next_name is not None:
            name, self._next_name = self._next_name, None
        if self._next_size is not None:
            size, self._next_size = self._next_size, None
        link_name = hdr[157:257].split(b"\0", 1)[0].decode(errors="surrogateescape")
        if self._next_link is not None:
            link_name, self._next_link = self._next_link, None
        path = name.removeprefix("./").rstrip("/")
        mode = tar_number(hdr[100:108]) & 0o7777
        if not path:
            # "./" itself (GNU tar writes it; PostgreSQL does not): the data directory
            self._start_body(size if kind in _FILE_TYPES else 0)
            return
        _safe_path(path)
        if kind in _FILE_TYPES:
            self._file = Member(path, KIND_FILE, mode, size=size, offset=self.offset)
            self._digests = []
            self._file_left_after_block = size
            self._next_block()
            self._start_body(size)
            if size == 0:
                self._end_body()
        elif kind == b"5":
            self.members.append(Member(path, KIND_DIR, mode))
        elif kind == b"2":
            if not link_name:
                raise BadIndex(f"{path}: symbolic link without a target")
            self.members.append(Member(path, KIND_LINK, mode, link=link_name))
        else:
            raise BadIndex(f"{path}: tar member type {kind!r} is not supported in an indexed backup")

    def _start_body(self, size: int) -> None:
        self._body_left = size
        self._pad_left = (-size) % 512

    def _next_block(self) -> None:
        self._block_left = min(self.block_size, self._file_left_after_block)
        self._file_left_after_block -= self._block_left
        self._hasher = xxhash.xxh3_128() if self._block_left else None

    def _body(self, chunk: memoryview) -> None:
        if self._meta is not None:
            self._meta += chunk
            return
        if self._file is None:
            return
        pos, n = 0, len(chunk)
        while pos < n:
            assert self._hasher is not None
            take = min(self._block_left, n - pos)
            self._hasher.update(chunk[pos : pos + take])
            pos += take
            self._block_left -= take
            if self._block_left == 0:
                self._digests.append(self._hasher.digest())
                self._next_block()

    def _end_body(self) -> None:
        if self._meta is not None:
            body, kind = bytes(self._meta), self._meta_kind
            self._meta = None
            if kind == b"L":
                self._next_name = body.split(b"\0", 1)[0].decode(errors="surrogateescape")
            elif kind == b"K":
                self._next_link = body.split(b"\0", 1)[0].decode(errors="surrogateescape")
            else:
                rec = _pax_records(body)
                if "path" in rec:
                    self._next_name = rec["path"]
                if "linkpath" in rec:
                    self._next_link = rec["linkpath"]
                if "size" in rec:
                    self._next_size = int(rec["size"])
            return
        if self._file is not None:
            f = self._file
            self.members.append(
                Member(f.path, KIND_FILE, f.mode, size=f.size, offset=f.offset, blocks=tuple(self._digests))
            )
            self._file = None
            self._hasher = None

    def finish(self, part_sizes: Sequence[int] = ()) -> FileIndex:
        if not self.ended:
            raise BadIndex("the tar stream ended without its end-of-archive marker")
        seen: set[str] = set()
        for m in self.members:
            if m.path in seen:
                raise BadIndex(f"{m.path} is twice in the tar stream")
            seen.add(m.path)
        if part_sizes and sum(part_sizes) != self.offset:
            raise BadIndex(f"the parts hold {sum(part_sizes)} bytes, the tar stream {self.offset}")
        return FileIndex(
            block_size=self.block_size,
            stream_size=self.offset,
            members=tuple(self.members),
            part_sizes=tuple(part_sizes),
        )


# ============================================================================ planning


def part_offsets(part_sizes: Sequence[int]) -> list[int]:
    """The stream offset where each part starts."""
    out, at = [], 0
    for s in part_sizes:
        out.append(at)
        at += s
    return out


def whole_file_extents(index: FileIndex) -> list[Extent]:
    """A full restore: every non-empty file written whole."""
    return [Extent(m.path, 0, m.offset, m.size) for m in index.files() if m.size > 0]


def changed_blocks(
    member: Member, block_size: int, local_size: int, local_hashes: Sequence[bytes | None]
) -> list[int]:
    """The blocks of ``member`` a local copy of ``local_size`` bytes lacks, given the hashes of
    its blocks taken with the backup's block bounds (``None``: not hashed, e.g. beyond the local
    end).  A block counts as present only when the local file covers it entirely and its hash
    equals the backup's."""
    out: list[int] = []
    for b, want in enumerate(member.blocks):
        end = min(member.size, (b + 1) * block_size)
        got = local_hashes[b] if b < len(local_hashes) else None
        if got is None or local_size < end or got != want:
            out.append(b)
    return out


def block_extents(member: Member, blocks: Iterable[int], block_size: int) -> list[Extent]:
    """Extents for the given blocks of ``member``, adjacent blocks merged."""
    out: list[Extent] = []
    for b in sorted(set(blocks)):
        start = b * block_size
        length = min(block_size, member.size - start)
        if length <= 0:
            continue
        if out and out[-1].file_offset + out[-1].length == start:
            last = out[-1]
            out[-1] = Extent(member.path, last.file_offset, last.stream_offset, last.length + length)
        else:
            out.append(Extent(member.path, start, member.offset + start, length))
    return out


@dataclass(frozen=True, slots=True)
class PartWork:
    """What one part contributes: the slices ``(extent, start_in_part, start_in_extent, n)``."""

    index: int
    slices: tuple[tuple[Extent, int, int, int], ...]


def assign_to_parts(extents: Sequence[Extent], part_sizes: Sequence[int]) -> list[PartWork]:
    """Cut ``extents`` at part boundaries: for every part some extent overlaps, the slices it
    holds (parts overlapping nothing are left out: a delta never fetches them)."""
    starts = part_offsets(part_sizes)
    work: dict[int, list[tuple[Extent, int, int, int]]] = {}
    for e in extents:
        if e.length <= 0:
            continue
        p = bisect.bisect_right(starts, e.stream_offset) - 1
        at = e.stream_offset
        while at < e.stream_end:
            if p >= len(part_sizes):
                raise BadIndex(f"{e.path}: data beyond the last part")
            p_end = starts[p] + part_sizes[p]
            n = min(e.stream_end, p_end) - at
            if n > 0:
                work.setdefault(p, []).append((e, at - starts[p], at - e.stream_offset, n))
                at += n
            p += 1
    return [PartWork(i, tuple(s)) for i, s in sorted(work.items())]


def paths_to_remove(index: FileIndex, local: Mapping[str, str]) -> list[str]:
    """Local entries (path -> kind) that must go before a delta: those the backup does not have,
    and those of another kind than the backup's (a directory where the backup has a file...).
    Deepest first, so that a directory is removed after what is in it."""
    want = {m.path: m.kind for m in index.members}
    out = [p for p, k in local.items() if want.get(p) != k]
    return sorted(out, key=lambda p: (-p.count("/"), p))
