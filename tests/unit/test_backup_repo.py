"""Backup repositories: filesystem in tmp_path, S3 against moto, the object codec, the config."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from hakeeper.backup import codec
from hakeeper.backup.errors import ContentConflict, CorruptObject, NotFound, RepoUnavailable
from hakeeper.backup.repo import FilesystemRepository, check_name
from hakeeper.backup.repos import make_repository
from hakeeper.backup.s3repo import S3Repository
from hakeeper.core.backup_config import BackupConfig, RepositoryConfig
from tests.support.ports import free_ports
from tests.support.repo_checks import (
    SEGMENT,
    check_basic_operations,
    check_create_never_replaces,
    check_duplicate_policy,
    check_streaming,
    wal_like,
)

# ---------------------------------------------------------------------------------- codec


@given(data=st.binary(max_size=20_000), cuts=st.lists(st.integers(1, 5000), max_size=8))
def test_codec_round_trip_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    enc = codec.Encoder(level=1)
    blob = bytearray()
    pos = 0
    for step in [*cuts, len(data)]:
        blob += enc.update(data[pos : pos + step])
        pos += step
    tail, trailer = enc.finish({"k": "v"})
    blob += tail
    assert (trailer.size, trailer.sha256) == (len(data), codec.sha256_hex(data))
    out, read_trailer = codec.decode(bytes(blob), "x")
    assert out == data
    assert read_trailer == trailer
    one_shot, _ = codec.encode(data, {"k": "v"}, level=1)
    assert codec.decode(one_shot, "x")[0] == data


@given(data=st.binary(min_size=1, max_size=3000), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_codec_never_returns_altered_content(data: bytes, where: float, bit: int) -> None:
    """A flipped bit either raises CorruptObject or leaves the content intact: a few header bits
    of a zstd frame (the unused bit, the single-segment flag) change nothing that is decoded,
    and the SHA-256 of the content proves it."""
    blob = bytearray(codec.encode(data, {"timeline": "1"})[0])
    blob[min(int(where * len(blob)), len(blob) - 1)] ^= 1 << bit
    try:
        decoded, _ = codec.decode(bytes(blob), "x")
    except CorruptObject:
        return
    assert decoded == data


def test_codec_detects_flipped_content_bits() -> None:
    data = wal_like(64 << 10)
    blob = codec.encode(data, {"timeline": "1"})[0]
    caught = 0
    for pos in range(20, len(blob) - 200, max(1, len(blob) // 300)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x10
        with pytest.raises(CorruptObject):
            codec.decode(bytes(flipped), "x")
        caught += 1
    assert caught > 100


def test_codec_detects_truncation_and_multithreaded_output_decodes() -> None:
    data = wal_like(4 << 20)
    blob, _ = codec.encode(data, {}, level=3, threads=2)
    assert codec.decode(blob, "x")[0] == data
    for cut in (1, 100, len(blob) // 2):
        with pytest.raises(CorruptObject):
            codec.decode(blob[:-cut], "x")
    with pytest.raises(CorruptObject):
        codec.decode(blob[: len(blob) // 2] + blob[-200:], "x")


def test_stored_object_is_a_plain_zstd_file() -> None:
    import zstandard

    blob, _ = codec.encode(b"hello" * 1000, {})
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    assert reader.read() == b"hello" * 1000


@given(data=st.binary(max_size=20_000), cuts=st.lists(st.integers(1, 5000), max_size=8))
def test_raw_objects_round_trip_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    """Already compressed content is stored as is: whole and streamed reads give it back,
    the trailer says codec none with size and SHA-256 of the content."""
    blob, trailer = codec.encode_raw(data, {"part": "3"})
    assert blob.startswith(codec.RAW_HEAD) and data in blob
    assert (trailer.codec, trailer.size, trailer.sha256) == ("none", len(data), codec.sha256_hex(data))
    assert codec.decode(blob, "x") == (data, trailer)
    dec = codec.Decoder("x")
    out = bytearray()
    pos = 0
    for step in [*cuts, len(blob)]:
        out += dec.feed(blob[pos : pos + step])
        pos += step
    rest, read_trailer = dec.finish()
    assert bytes(out + rest) == data and read_trailer == trailer


@given(data=st.binary(max_size=20_000), cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_raw_streaming_encoder_writes_what_encode_raw_writes(data: bytes, cuts: list[int]) -> None:
    """However the content is cut (empty chunks included), the streamed stored form is byte
    for byte the one-shot one: a part streamed during a backup reads back like a part put whole."""
    enc = codec.RawEncoder()
    blob = bytearray()
    pos = 0
    for step in [*cuts, len(data)]:
        blob += enc.update(data[pos : pos + step])
        pos += step
    tail, trailer = enc.finish({"part": "1"})
    blob += tail
    assert (bytes(blob), trailer) == codec.encode_raw(data, {"part": "1"})


async def test_fs_put_stream_as_is_reads_back(fs_repo: FilesystemRepository) -> None:
    data = os.urandom(3 << 20)
    r = await fs_repo.put_stream("base/raw", _chunks(data), meta={"part": "0"}, as_is=True)
    assert (r.size, r.sha256) == (len(data), codec.sha256_hex(data))
    assert r.stored_size == len(codec.encode_raw(data, {"part": "0"})[0])
    assert await fs_repo.get("base/raw") == data
    assert (await fs_repo.stat("base/raw")).meta == {"part": "0"}


@given(data=st.binary(min_size=1, max_size=3000), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_raw_objects_never_return_altered_content(data: bytes, where: float, bit: int) -> None:
    blob = bytearray(codec.encode_raw(data, {})[0])
    blob[min(int(where * len(blob)), len(blob) - 1)] ^= 1 << bit

    def streamed(b: bytes) -> bytes:
        dec = codec.Decoder("x")
        head = dec.feed(b)
        return head + dec.finish()[0]

    for read in (lambda b: codec.decode(b, "x")[0], streamed):
        try:
            got = read(bytes(blob))
        except CorruptObject:
            continue
        assert got == data


def test_raw_and_compressed_heads_cannot_be_mixed_up() -> None:
    data = wal_like(256 << 10)
    raw, _ = codec.encode_raw(data, {})
    packed, _ = codec.encode(data, {})
    # a compressed object's trailer after a raw head (and the other way round) is refused
    body = raw[: len(raw) - len(codec.encode_raw(b"", {})[1].to_bytes())]
    mixed = body + codec.encode(data, {})[1].to_bytes()
    for blob in (mixed, codec.RAW_HEAD + packed):
        with pytest.raises(CorruptObject):
            codec.decode(blob, "x")
        dec = codec.Decoder("x")
        with pytest.raises(CorruptObject):
            dec.feed(blob)
            dec.finish()


async def test_fs_stores_compressed_data_as_is(tmp_path: Path) -> None:
    import zstandard

    repo = FilesystemRepository(tmp_path / "repo", name="local")
    await repo.initialize()
    data = zstandard.ZstdCompressor().compress(wal_like(1 << 20))
    put = await repo.put("b/part", data, as_is=True)
    assert (put.size, put.sha256) == (len(data), codec.sha256_hex(data))
    assert put.stored_size < len(data) + 1024
    assert await repo.get("b/part") == data
    assert b"".join([c async for c in repo.get_stream("b/part")]) == data
    st_ = await repo.stat("b/part")
    assert (st_.size, st_.sha256) == (len(data), put.sha256)


def test_object_names_are_checked() -> None:
    for bad in ("", "/abs", "a//b", "../x", "a/../b", ".hidden", "a/.tmp", "sp ace", "a/"):
        with pytest.raises(ValueError):
            check_name(bad)
    assert check_name("wal/000000010000000000000001.partial") == "wal/000000010000000000000001.partial"


# ---------------------------------------------------------------------------------- filesystem


@pytest.fixture
async def fs_repo(tmp_path: Path) -> AsyncIterator[FilesystemRepository]:
    repo = FilesystemRepository(tmp_path / "repo", name="local")
    await repo.initialize()
    yield repo


async def test_fs_operations(fs_repo: FilesystemRepository) -> None:
    await check_basic_operations(fs_repo)
    await check_streaming(fs_repo)


async def test_fs_duplicate_policy(fs_repo: FilesystemRepository) -> None:
    await check_duplicate_policy(fs_repo)
    await check_create_never_replaces(fs_repo)


async def test_fs_writes_leave_no_temporary_files(fs_repo: FilesystemRepository) -> None:
    await fs_repo.put(SEGMENT, b"a")
    await fs_repo.put(SEGMENT, b"b")
    await fs_repo.put_unique("wal/x", b"c")
    await fs_repo.put_unique("wal/x", b"c")
    files = sorted(p.relative_to(fs_repo.root).as_posix() for p in fs_repo.root.rglob("*") if p.is_file())
    assert files == [SEGMENT, "wal/x"]


async def test_fs_failed_stream_leaves_nothing(fs_repo: FilesystemRepository) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        await fs_repo.put_stream("base/f", broken())
    assert [p for p in fs_repo.root.rglob("*") if p.is_file()] == []


async def test_fs_corruption_is_detected(fs_repo: FilesystemRepository) -> None:
    data = wal_like(512 * 1024)
    await fs_repo.put(SEGMENT, data)
    path = fs_repo.root / SEGMENT
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptObject):
        await fs_repo.get(SEGMENT)
    with pytest.raises(CorruptObject):
        async for _ in fs_repo.get_stream(SEGMENT):
            pass
    # a re-push onto a corrupt object is a conflict too: never overwrite what we cannot read
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptObject):
        await fs_repo.stat(SEGMENT)
    with pytest.raises(ContentConflict) as ei:
        await fs_repo.put_unique(SEGMENT, data)
    assert ei.value.existing_sha256 is None
    assert path.read_bytes() == b"garbage"


async def test_fs_missing_root_is_unavailable_not_not_found(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "unmounted")
    for coro in (
        repo.get(SEGMENT),
        repo.stat(SEGMENT),
        repo.put(SEGMENT, b"x"),
        repo.put_unique(SEGMENT, b"x"),
        repo.list_objects(),
        repo.delete(SEGMENT),
    ):
        with pytest.raises(RepoUnavailable):
            await coro
    assert not (tmp_path / "unmounted").exists()  # never created behind our back


def _get_as_nobody(root: str, name: str) -> str:
    """In a child process that dropped root (root ignores directory permissions): what get()
    raised, by class name."""
    import asyncio
    import pwd

    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)
    try:
        asyncio.run(FilesystemRepository(root, name="local").get(name))
    except Exception as e:
        return type(e).__name__
    return "no error"


def test_fs_permission_error_is_unavailable() -> None:
    import asyncio
    import multiprocessing
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="hk-perm-", dir="/tmp"))  # traversable by nobody
    repo = FilesystemRepository(base / "repo", name="local")

    async def setup() -> None:
        await repo.initialize()
        await repo.put(SEGMENT, b"x")

    try:
        base.chmod(0o755)
        asyncio.run(setup())
        for d in [repo.root, *repo.root.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644)  # readable by nobody but for the next line
        (repo.root / "wal").chmod(0)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            raised = pool.apply(_get_as_nobody, (str(repo.root), SEGMENT))
        assert raised == "RepoUnavailable"
    finally:
        if (repo.root / "wal").exists():
            (repo.root / "wal").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _s3(endpoint: str, bucket: str, **kw: object) -> S3Repository:
    return S3Repository(
        bucket=bucket,
        endpoint=endpoint,
        prefix="cluster1",
        access_key="test",
        secret_key="test",
        timeout=10,
        max_attempts=1,
        part_size=5 << 20,
        name="moto",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def moto_repo(moto_endpoint: str, request: pytest.FixtureRequest) -> AsyncIterator[S3Repository]:
    bucket = "b-" + request.node.name.replace("_", "-")[:50].lower()
    repo = _s3(moto_endpoint, bucket)
    async with repo:
        await repo.initialize()
        yield repo


async def test_s3_operations(moto_repo: S3Repository) -> None:
    await check_basic_operations(moto_repo)
    await check_streaming(moto_repo)


async def test_s3_multipart_stream(moto_repo: S3Repository) -> None:
    data = os.urandom(11 << 20)  # incompressible: three 5 MiB parts
    r = await moto_repo.put_stream("base/rand", _chunks(data))
    assert r.stored_size > 10 << 20
    assert await moto_repo.get("base/rand") == data


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 1 << 20):
        yield data[i : i + (1 << 20)]


async def test_s3_duplicate_policy(moto_repo: S3Repository) -> None:
    await check_duplicate_policy(moto_repo)
    await check_create_never_replaces(moto_repo)


async def test_s3_keys_live_under_the_prefix_and_carry_metadata(moto_repo: S3Repository) -> None:
    data = b"segment" * 100
    await moto_repo.put(SEGMENT, data)
    assert moto_repo.endpoint is not None
    raw = boto3.client(
        "s3",
        endpoint_url=moto_repo.endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    head = raw.head_object(Bucket=moto_repo.bucket, Key=f"cluster1/{SEGMENT}")
    assert head["Metadata"] == {"hk-sha256": codec.sha256_hex(data), "hk-size": str(len(data))}
    raw.put_object(Bucket=moto_repo.bucket, Key=f"cluster1/{SEGMENT}", Body=b"tampered")
    with pytest.raises(CorruptObject):
        await moto_repo.get(SEGMENT)


async def test_s3_missing_bucket_is_unavailable_not_not_found(moto_endpoint: str) -> None:
    async with _s3(moto_endpoint, "no-such-bucket") as repo:
        for coro in (repo.get(SEGMENT), repo.stat(SEGMENT), repo.put(SEGMENT, b"x"), repo.list_objects()):
            with pytest.raises(RepoUnavailable):
                await coro


async def test_s3_closed_port_is_unavailable() -> None:
    (port,) = free_ports(1)
    async with _s3(f"http://127.0.0.1:{port}", "bucket") as repo:
        for coro in (repo.get(SEGMENT), repo.stat(SEGMENT), repo.put_unique(SEGMENT, b"x")):
            with pytest.raises(RepoUnavailable):
                await coro


async def test_s3_not_found(moto_repo: S3Repository) -> None:
    with pytest.raises(NotFound):
        await moto_repo.get("wal/missing")
    with pytest.raises(NotFound):
        await moto_repo.stat("wal/missing")


# ---------------------------------------------------------------------------------- config


def test_config_builds_both_repository_types(tmp_path: Path) -> None:
    cfg = BackupConfig.model_validate(
        {
            "repositories": [
                {"name": "local", "type": "fs", "path": str(tmp_path)},
                {
                    "name": "remote",
                    "type": "s3",
                    "endpoint": "https://s3.example.net/",
                    "bucket": "pg",
                    "prefix": "/prod/",
                    "access_key": "AK",
                    "secret_key": "SK",
                    "ca_file": str(tmp_path / "ca.pem"),
                    "offsite": True,
                    "compression_level": 6,
                },
            ]
        }
    )
    local, remote = (make_repository(r) for r in cfg.repositories)
    assert isinstance(local, FilesystemRepository) and local.root == tmp_path and local.name == "local"
    assert isinstance(remote, S3Repository)
    assert (remote.endpoint, remote.prefix, remote.offsite, remote.level) == (
        "https://s3.example.net",
        "prod",
        True,
        6,
    )
    assert "SK" not in repr(cfg) and "SK" not in str(cfg.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ({"name": "a", "type": "fs"}, "type fs needs path"),
        ({"name": "a", "type": "fs", "path": "relative/dir"}, "must be absolute"),
        ({"name": "a", "type": "fs", "path": "/x", "bucket": "b"}, "bucket not allowed for a repo"),
        ({"name": "a", "type": "s3", "endpoint": "http://h:1"}, "type s3 needs bucket"),
        ({"name": "a", "type": "s3", "bucket": "b", "path": "/x"}, "path not allowed"),
        ({"name": "a", "type": "s3", "bucket": "b", "access_key": "k"}, "given together"),
        ({"name": "a", "type": "s3", "bucket": "b", "endpoint": "h:9000"}, "must start with http"),
        ({"name": "a", "type": "s3", "bucket": "b", "ca_file": "/ca", "verify_tls": False}, "verify_tls"),
        ({"name": "a", "type": "nfs", "path": "/x"}, "'fs' or 's3'"),
        ({"name": "a b", "type": "fs", "path": "/x"}, "letters, digits"),
        ({"name": "a", "type": "fs", "path": "/x", "compression_level": 30}, "less than or equal to 19"),
        ({"name": "a", "type": "fs", "path": "/x", "pathh": "/y"}, "Extra inputs"),
    ],
)
def test_config_errors_say_what_is_wrong(repo: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as ei:
        BackupConfig.model_validate({"repositories": [repo]})
    assert message in str(ei.value)


def test_config_repository_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="repeated: a"):
        BackupConfig(
            repositories=[
                RepositoryConfig(name="a", type="fs", path=Path("/x")),
                RepositoryConfig(name="a", type="fs", path=Path("/y")),
            ]
        )


# ------------------------------------------------------------- base backup parts, streamed


def _run_for(repo: FilesystemRepository) -> object:
    import datetime as dt

    from hakeeper.backup.basebackup import _Run
    from hakeeper.backup.catalog import BackupRecord, BackupStatus

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rec = BackupRecord(id="b1", label="b1", status=BackupStatus.RUNNING, scope="s", repository=repo.name,
                       start_time=now, updated_at=now)  # fmt: skip
    return _Run(repo, "s", rec, None)


@pytest.mark.parametrize("parallel", [1, 3])
async def test_streamed_parts_cut_at_the_part_size_and_read_back_in_order(
    fs_repo: FilesystemRepository, parallel: int
) -> None:
    from hakeeper.backup.basebackup import _StreamedParts
    from hakeeper.backup.catalog import object_key, part_name

    data = os.urandom(10 << 20)
    parts = _StreamedParts(_run_for(fs_repo), 3 << 20, parallel)  # type: ignore[arg-type]
    for i in range(0, len(data), 1 << 20):
        await parts.feed(data[i : i + (1 << 20)])
        await parts.feed(b"")
    results = await parts.finish()
    assert [r.size for r in results] == [3 << 20, 3 << 20, 3 << 20, 1 << 20]
    back = b"".join([await fs_repo.get(object_key("s", "b1", part_name(i))) for i in range(4)])
    assert back == data
    assert [(await fs_repo.stat(r.name)).meta["part"] for r in results] == ["0", "1", "2", "3"]


async def test_streamed_parts_of_an_empty_stream_store_one_empty_part(fs_repo: FilesystemRepository) -> None:
    from hakeeper.backup.basebackup import _StreamedParts

    results = await _StreamedParts(_run_for(fs_repo), 1 << 20, 2).finish()  # type: ignore[arg-type]
    assert [r.size for r in results] == [0]
    assert await fs_repo.get(results[0].name) == b""


async def test_a_part_that_cannot_be_stored_ends_the_stream(fs_repo: FilesystemRepository) -> None:
    """The writer of a part fails (the repository's disk is gone): the next feed raises instead
    of waiting for a reader that is not there, and nothing half-written stays."""
    from hakeeper.backup.basebackup import _StreamedParts

    async def broken(*a: object, **k: object) -> None:
        raise RepoUnavailable("local: write: disk gone")

    fs_repo._store_stream = broken  # type: ignore[method-assign,assignment]
    parts = _StreamedParts(_run_for(fs_repo), 64 << 20, 2)  # type: ignore[arg-type]
    with pytest.raises(RepoUnavailable):
        async with asyncio.timeout(10):
            for _ in range(50):
                await parts.feed(b"y" * 1000)
            await parts.finish()
    await parts.cancel()
    assert [p for p in fs_repo.root.rglob("*") if p.is_file()] == []
