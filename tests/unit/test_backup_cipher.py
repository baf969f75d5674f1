"""Encrypted repositories (issue 12, finding 7): the sealed format of :mod:`hakeeper.backup.cipher`,
the repository layer that applies it, key files and the configuration; repository file modes
(finding 6)."""

from __future__ import annotations

import base64
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
import typer
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from moto.server import ThreadedMotoServer

from hakeeper.backup import cipher, codec
from hakeeper.backup.copy import copy_object
from hakeeper.backup.errors import (
    AuthenticationFailed,
    CorruptObject,
    EncryptionMismatch,
    RepoError,
    WrongKey,
)
from hakeeper.backup.repo import MARKER, FilesystemRepository, Outcome
from hakeeper.backup.repos import make_repository
from hakeeper.backup.s3repo import S3Repository
from hakeeper.cli.app import app, load_or_exit
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.util.keyfile import KEY_BYTES, new_key_text, read_key_file
from tests.support.ports import free_ports
from tests.support.repo_checks import (
    SEGMENT,
    check_basic_operations,
    check_create_never_replaces,
    check_duplicate_policy,
    check_streaming,
    wal_like,
)

KEY = cipher.Key.from_bytes(bytes(range(32)))
OTHER = cipher.Key.from_bytes(bytes(range(1, 33)))
C = cipher.CHUNK


def _feed(opener: cipher.Opener, blob: bytes, step: int) -> bytes:
    out = bytearray()
    for i in range(0, len(blob), step):
        out += opener.feed(blob[i : i + step])
    return bytes(out + opener.finish())


def _seal_in_pieces(key: cipher.Key, name: str, data: bytes, step: int) -> bytes:
    s = cipher.Sealer(key, name)
    out = bytearray()
    for i in range(0, len(data), step):
        out += s.update(data[i : i + step])
    return bytes(out + s.finish())


def _records(blob: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every record of a sealed object."""
    out = []
    pos = cipher.HEADER_LEN
    while True:
        flag, n = blob[pos], int.from_bytes(blob[pos + 1 : pos + 5], "big")
        out.append((pos, 5 + n + cipher.TAG_BYTES))
        pos += 5 + n + cipher.TAG_BYTES
        if flag == 1:
            return out


# ---------------------------------------------------------------------------------- the format


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 5 * C + 123])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = cipher.seal(KEY, "base/p1", data)
    assert len(blob) == size + cipher.HEADER_LEN + cipher.FOOTER_LEN + len(_records(blob)) * 21
    assert cipher.open_sealed(KEY, "base/p1", "r", blob) == data
    assert _feed(cipher.Opener(KEY, "base/p1", "r"), blob, 65_537) == data
    # a codec object: its trailer is the final record, which the tail alone authenticates
    stored, trailer = codec.encode(data, {"k": "v"}, level=1)
    sealed = _seal_in_pieces(KEY, "base/p1", stored, 300_001)
    assert cipher.open_sealed(KEY, "base/p1", "r", sealed) == stored
    tail = sealed[-4096:]
    need = cipher.tail_needed(tail)
    assert need is not None and need <= 4096
    assert codec.parse_trailer(cipher.open_tail(KEY, "base/p1", "r", tail), "x")[1] == trailer


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), step=st.integers(1, 700), chunk=st.integers(1, 300))
def test_round_trip_of_random_sizes_in_any_chunking(data: bytes, step: int, chunk: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cipher, "CHUNK", chunk)
        blob = _seal_in_pieces(KEY, "wal/x", data, step)
        assert _feed(cipher.Opener(KEY, "wal/x", "r"), blob, step) == data
        assert len(_records(blob)) == max(1, -(-len(data) // chunk))


def test_every_flipped_byte_fails_and_never_returns_altered_content() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cipher, "CHUNK", 100)
        data = os.urandom(450)
        blob = cipher.seal(KEY, "wal/x", data)
        for pos in range(len(blob)):
            bad = bytearray(blob)
            bad[pos] ^= 0x01
            with pytest.raises(RepoError) as ei:
                _feed(cipher.Opener(KEY, "wal/x", "r"), bytes(bad), 64)
            if cipher.HEADER_LEN <= pos < len(blob) - cipher.FOOTER_LEN:  # the records
                assert isinstance(ei.value, AuthenticationFailed), pos
                assert "wal/x" in str(ei.value) and "authentication failed" in str(ei.value)
            elif 8 <= pos < 24:  # the fingerprint in the header
                assert isinstance(ei.value, WrongKey), pos
            else:
                assert isinstance(ei.value, CorruptObject | EncryptionMismatch), pos


def test_truncation_anywhere_is_detected() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cipher, "CHUNK", 64)
        blob = cipher.seal(KEY, "wal/x", os.urandom(300))
        for cut in range(len(blob)):
            with pytest.raises(CorruptObject):
                cipher.open_sealed(KEY, "wal/x", "r", blob[:cut])
        # whole records dropped at the end, the final flag left out: still refused
        recs = _records(blob)
        without_final = blob[: recs[-1][0]]
        with pytest.raises(AuthenticationFailed, match="no final record"):
            cipher.open_sealed(KEY, "wal/x", "r", without_final)
        with pytest.raises(AuthenticationFailed, match="after the final record"):
            cipher.open_sealed(KEY, "wal/x", "r", blob + blob[-200:])


def test_swapped_or_repeated_records_fail() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cipher, "CHUNK", 64)
        blob = cipher.seal(KEY, "wal/x", os.urandom(64 * 4 + 10))
        (a, la), (b, lb) = _records(blob)[:2]
        assert la == lb
        swapped = blob[:a] + blob[b : b + lb] + blob[a : a + la] + blob[b + lb :]
        with pytest.raises(AuthenticationFailed, match="record 0"):
            cipher.open_sealed(KEY, "wal/x", "r", swapped)
        repeated = blob[:b] + blob[a : a + la] + blob[b + lb :]
        with pytest.raises(AuthenticationFailed, match="record 1"):
            cipher.open_sealed(KEY, "wal/x", "r", repeated)
        # a record from another object sealed with the same key, at the same position
        other = cipher.seal(KEY, "wal/x", os.urandom(64 * 4 + 10))
        mixed = blob[:a] + other[a : a + la] + blob[a + la :]
        with pytest.raises(AuthenticationFailed):
            cipher.open_sealed(KEY, "wal/x", "r", mixed)


def test_an_object_under_another_name_fails_authentication() -> None:
    blob = cipher.seal(KEY, "c/wal/000000010000000000000001", b"segment one")
    with pytest.raises(AuthenticationFailed, match="stored under another name"):
        cipher.open_sealed(KEY, "c/wal/000000010000000000000002", "r", blob)
    stored, _ = codec.encode(b"x", {})
    sealed = cipher.seal(KEY, "c/backup/A/backup.json", stored)
    with pytest.raises(AuthenticationFailed):
        cipher.open_tail(KEY, "c/backup/B/backup.json", "r", sealed)


def test_wrong_key_and_plain_objects_are_named_as_such() -> None:
    blob = cipher.seal(KEY, "n", b"data")
    with pytest.raises(WrongKey) as ei:
        cipher.open_sealed(OTHER, "n", "fs1", blob)
    assert str(ei.value) == (
        f"repository fs1: object n was encrypted with another key (fingerprint {KEY.fingerprint_hex}; "
        f"the configured key's fingerprint is {OTHER.fingerprint_hex})"
    )
    with pytest.raises(WrongKey):
        cipher.open_tail(OTHER, "n", "fs1", blob)
    plain, _ = codec.encode(b"data", {})
    with pytest.raises(EncryptionMismatch, match="object n is not encrypted"):
        cipher.open_sealed(KEY, "n", "fs1", plain)
    with pytest.raises(EncryptionMismatch, match="object n is not encrypted"):
        cipher.open_tail(KEY, "n", "fs1", plain)
    assert cipher.sealed_tail_fingerprint(blob) == KEY.fingerprint_hex
    assert cipher.sealed_tail_fingerprint(plain) is None


def test_a_forged_footer_is_refused() -> None:
    stored, _ = codec.encode(os.urandom(5000), {})
    blob = bytearray(cipher.seal(KEY, "n", stored))
    idx = len(blob) - cipher.FOOTER_LEN + cipher.HEADER_LEN
    blob[idx + 7] ^= 1  # the final record's index
    with pytest.raises(AuthenticationFailed):
        cipher.open_tail(KEY, "n", "r", bytes(blob))
    with pytest.raises(AuthenticationFailed, match="footer"):
        cipher.open_sealed(KEY, "n", "r", bytes(blob))


def test_keys_salts_and_fingerprints() -> None:
    assert "master" not in repr(KEY) and bytes(range(32)).hex() not in repr(KEY)
    assert len(KEY.fingerprint) == 16 and KEY.fingerprint != OTHER.fingerprint
    assert cipher.Key.from_bytes(bytes(range(32))).fingerprint == KEY.fingerprint  # stable
    a, b = cipher.seal(KEY, "n", b"same"), cipher.seal(KEY, "n", b"same")
    assert a != b  # a fresh salt (so a fresh object key and nonces) per object
    with pytest.raises(ValueError):
        cipher.Key.from_bytes(b"short")


# ---------------------------------------------------------------------------------- repositories


@pytest.fixture
async def enc_repo(tmp_path: Path) -> AsyncIterator[FilesystemRepository]:
    repo = FilesystemRepository(tmp_path / "repo", name="enc", key=KEY.master)
    await repo.initialize()
    yield repo


async def test_encrypted_fs_repository_operations(enc_repo: FilesystemRepository) -> None:
    await check_basic_operations(enc_repo)
    await check_streaming(enc_repo)
    await check_duplicate_policy(enc_repo)
    await check_create_never_replaces(enc_repo)


async def test_nothing_of_the_content_is_stored_in_the_clear(enc_repo: FilesystemRepository) -> None:
    secret = b"row-marker-7f3a9c " * 5000
    await enc_repo.put("c/backup/B1/backup.json", b'{"id": "B1", "note": "row-marker-7f3a9c"}')
    await enc_repo.put_stream("c/backup/B1/part-0001", _chunks(secret), meta={"kind": "row-marker"})
    await enc_repo.put("c/wal/000000010000000000000001", secret, as_is=True)  # not even compressed
    files = [p for p in enc_repo.root.rglob("*") if p.is_file() and p.name != MARKER]
    assert len(files) == 3
    for p in files:
        assert b"row-marker" not in p.read_bytes(), p
        assert p.read_bytes().startswith(cipher.MAGIC)
    assert await enc_repo.get("c/wal/000000010000000000000001") == secret


async def _chunks(data: bytes, step: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


async def test_identical_content_is_recognised_though_the_sealed_bytes_differ(
    enc_repo: FilesystemRepository,
) -> None:
    data = wal_like(200_000)
    await enc_repo.put_unique(SEGMENT, data)
    first = (enc_repo.root / SEGMENT).read_bytes()
    await enc_repo.put(SEGMENT + ".copy", data)
    assert (enc_repo.root / (SEGMENT + ".copy")).read_bytes()[56:] != first[56:]
    assert (await enc_repo.put_unique(SEGMENT, data)).outcome is Outcome.ALREADY_PRESENT
    assert (enc_repo.root / SEGMENT).read_bytes() == first


async def test_tampering_on_disk_is_refused_naming_the_object(enc_repo: FilesystemRepository) -> None:
    a, b = "c/wal/000000010000000000000001", "c/wal/000000010000000000000002"
    await enc_repo.put(a, wal_like(100_000, seed=1))
    await enc_repo.put(b, wal_like(100_000, seed=2))
    pa, pb = enc_repo.root / a, enc_repo.root / b
    # two segments swapped by someone with write access to the repository
    ba, bb = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(bb)
    pb.write_bytes(ba)
    for op in (enc_repo.get, enc_repo.stat):
        with pytest.raises(AuthenticationFailed, match=f"{a}: corrupt object: authentication failed"):
            await op(a)
    # a flipped byte in the content
    flipped = bytearray(ba)
    flipped[len(flipped) // 2] ^= 0x80
    pa.write_bytes(bytes(flipped))
    with pytest.raises(AuthenticationFailed, match="repository enc"):
        await enc_repo.get(a)
    with pytest.raises(AuthenticationFailed):
        async for _ in enc_repo.get_stream(a):
            pass
    # a tampered record: refused, not parsed
    await enc_repo.put("c/backup/B/backup.json", b'{"status": "complete"}')
    rec = enc_repo.root / "c/backup/B/backup.json"
    blob = bytearray(rec.read_bytes())
    blob[cipher.HEADER_LEN + 7] ^= 0x01
    rec.write_bytes(bytes(blob))
    with pytest.raises(AuthenticationFailed):
        await enc_repo.get("c/backup/B/backup.json")


async def test_wrong_key_missing_key_and_plain_repositories_are_told_apart(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    enc = FilesystemRepository(root, name="enc", key=KEY.master)
    await enc.initialize()
    await enc.put(SEGMENT, b"x" * 1000)
    wrong = FilesystemRepository(root, name="enc", key=OTHER.master)
    for op in (wrong.get, wrong.stat):
        with pytest.raises(WrongKey, match=f"fingerprint {KEY.fingerprint_hex}"):
            await op(SEGMENT)
    with pytest.raises(EncryptionMismatch, match="encrypted with another key"):
        await wrong.put("other", b"y")  # the marker refuses before anything is written
    plain = FilesystemRepository(root, name="enc")
    for op in (plain.get, plain.stat):
        with pytest.raises(EncryptionMismatch, match="no encryption key is configured"):
            await op(SEGMENT)
    with pytest.raises(EncryptionMismatch, match="no key is configured"):
        await plain.put("other", b"y")
    assert not (root / "other").exists()
    # an exclusive create (how backup ids are claimed) is sealed and refused the same way
    for repo, says in ((wrong, "encrypted with another key"), (plain, "no key is configured")):
        with pytest.raises(EncryptionMismatch, match=says):
            await repo.create("claimed", b"{}")
    assert not (root / "claimed").exists()
    assert await enc.create("claimed", b"{}") and not await enc.create("claimed", b"[]")
    assert cipher.is_sealed_head((root / "claimed").read_bytes()) and await enc.get("claimed") == b"{}"
    # and the other way round: a plain object read with a key
    proot = tmp_path / "plain"
    p = FilesystemRepository(proot, name="plain")
    await p.initialize()
    await p.put(SEGMENT, b"z")
    keyed = FilesystemRepository(proot, name="plain", key=KEY.master)
    for op in (keyed.get, keyed.stat):
        with pytest.raises(EncryptionMismatch, match="is not encrypted"):
            await op(SEGMENT)


async def test_copies_between_plain_and_encrypted_repositories(tmp_path: Path) -> None:
    data = wal_like(3 << 20)
    repos = [
        FilesystemRepository(tmp_path / "a", name="a", key=KEY.master),
        FilesystemRepository(tmp_path / "b", name="b"),
        FilesystemRepository(tmp_path / "c", name="c", key=OTHER.master),
        FilesystemRepository(tmp_path / "d", name="d", key=KEY.master),
    ]
    for r in repos:
        await r.initialize()
    await repos[0].put_stream("c/backup/B/part", _chunks(data))
    for src, dst in itertools.pairwise(repos):
        await copy_object(src, dst, "c/backup/B/part")
        assert await dst.get("c/backup/B/part") == data
        assert (await dst.stat("c/backup/B/part")).sha256 == codec.sha256_hex(data)
    assert (tmp_path / "b/c/backup/B/part").read_bytes().startswith(b"\x28\xb5\x2f\xfd")  # plain zstd
    assert (tmp_path / "c/c/backup/B/part").read_bytes()[8:24] == OTHER.fingerprint


async def test_an_unreadable_key_is_a_repository_error(tmp_path: Path) -> None:
    def missing() -> bytes:
        return read_key_file(tmp_path / "nope")

    repo = FilesystemRepository(tmp_path / "r", name="r", key=missing)
    await repo.initialize()
    with pytest.raises(RepoError, match=r"repository r: encryption key: key file .*nope"):
        await repo.put("x", b"1")


# ---------------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


async def test_encrypted_s3_repository(moto_endpoint: str) -> None:
    repo = S3Repository(
        bucket="enc",
        endpoint=moto_endpoint,
        prefix="p",
        access_key="test",
        secret_key="test",
        timeout=10,
        max_attempts=1,
        part_size=5 << 20,
        name="moto",
        key=KEY.master,
    )
    async with repo:
        await repo.initialize()
        await check_basic_operations(repo)
        await check_duplicate_policy(repo)
        big = os.urandom(11 << 20)  # multipart, several records per part
        await repo.put_stream("base/rand", _chunks(big, 1 << 20))
        assert await repo.get("base/rand") == big
    raw = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    head = raw.head_object(Bucket="enc", Key=f"p/{SEGMENT}")
    assert head["Metadata"] == {}  # no plaintext checksum or size beside the sealed body
    body = raw.get_object(Bucket="enc", Key=f"p/{SEGMENT}")["Body"].read()
    assert body.startswith(cipher.MAGIC)
    marker = raw.get_object(Bucket="enc", Key=f"p/{MARKER}")["Body"].read()
    assert KEY.fingerprint_hex.encode() in codec.decode(marker, MARKER)[0]


# ---------------------------------------------------------------------------------- file modes


async def test_repository_files_are_0600_and_directories_0700(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "repo", name="r")
    await repo.initialize()
    await repo.put("c/wal/x", b"1")
    await repo.put_stream("c/backup/B/part", _chunks(b"2" * 1000))
    await repo.put_unique("c/wal/y", b"3")
    assert (repo.root.stat().st_mode & 0o777) == 0o700
    for p in repo.root.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        assert p.stat().st_mode & 0o777 == want & ~_umask(), p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
async def test_as_root_new_files_belong_to_the_repository_owner(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    root = tmp_path / "repo"
    root.mkdir()
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    repo = FilesystemRepository(root, name="r")
    await repo.put("c/wal/x", b"1")
    await repo.put_stream("c/backup/B/part", _chunks(b"2" * 1000))
    for p in root.rglob("*"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), p


async def test_old_temporary_files_are_removed_by_listings(tmp_path: Path) -> None:
    repo = FilesystemRepository(tmp_path / "repo", name="r")
    await repo.initialize()
    await repo.put("c/wal/x", b"1")
    old = repo.root / "c/wal/.x.abcdef.tmp"
    fresh = repo.root / "c/wal/.y.abcdef.tmp"
    other = repo.root / "c/wal/.keep"
    for p in (old, fresh, other):
        p.write_bytes(b"partial")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert [e.name for e in await repo.list_objects("c/")] == ["c/wal/x"]
    assert not old.exists() and fresh.exists() and other.exists()


# ---------------------------------------------------------------------------------- keys, config


def _key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_key_files_raw_or_base64_and_never_loose(tmp_path: Path) -> None:
    raw = os.urandom(KEY_BYTES)
    assert read_key_file(_key_file(tmp_path / "raw", raw)) == raw
    text = new_key_text()
    assert read_key_file(_key_file(tmp_path / "b64", text.encode() + b"\n")) == base64.b64decode(text)
    with pytest.raises(ValueError, match=r"accessible by group or others \(mode 0640\).*chmod 600"):
        read_key_file(_key_file(tmp_path / "loose", raw, 0o640))
    with pytest.raises(ValueError, match="holds 16 bytes"):
        read_key_file(_key_file(tmp_path / "short", base64.b64encode(os.urandom(16)) + b"\n"))
    with pytest.raises(ValueError, match="not a base64 key"):
        read_key_file(_key_file(tmp_path / "junk", b"not a key at all\n"))
    with pytest.raises(ValueError, match="No such file"):
        read_key_file(tmp_path / "absent")


def _node_yaml(tmp_path: Path, encryption: dict[str, str]) -> Path:
    conf = tmp_path / "node.yml"
    conf.write_text(
        yaml.safe_dump(
            {
                "scope": "c",
                "name": "n1",
                "postgresql": {
                    "data_dir": str(tmp_path / "data"),
                    "superuser": {"password": "su-secret"},
                    "replication": {"password": "repl-secret"},
                },
                "backup": {
                    "repositories": [
                        {"name": "plain", "type": "fs", "path": str(tmp_path / "r0")},
                        {"name": "enc", "type": "fs", "path": str(tmp_path / "r1"), "encryption": encryption},
                    ]
                },
            }
        )
    )
    return conf


def _load(conf: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """What ``hakeeper`` does with the node file: (exit code, stderr)."""
    try:
        load_or_exit(conf)
    except typer.Exit as e:
        return e.exit_code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_config_loads_a_good_key_and_names_file_and_field_for_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _key_file(tmp_path / "k", new_key_text().encode())
    assert _load(_node_yaml(tmp_path, {"key_file": str(good)}), capsys) == (0, "")
    cfg = load_or_exit(_node_yaml(tmp_path, {"key_file": str(good)}))
    repo = make_repository(cfg.backup.repositories[1])
    assert repo.encrypted and not make_repository(cfg.backup.repositories[0]).encrypted

    good.chmod(0o644)
    conf = _node_yaml(tmp_path, {"key_file": str(good)})
    code, err = _load(conf, capsys)
    assert code == 2
    assert " ".join(err.split()).startswith(
        f"{conf}: backup.repositories.1.encryption.key_file (repository enc): key file {good} is "
        "accessible by group or others (mode 0644)"
    )
    monkeypatch.delenv("HK_TEST_KEY", raising=False)
    code, err = _load(_node_yaml(tmp_path, {"key_env": "HK_TEST_KEY"}), capsys)
    assert code == 2 and "encryption.key_env (repository enc): environment variable HK_TEST_KEY" in err
    monkeypatch.setenv("HK_TEST_KEY", new_key_text())
    assert _load(_node_yaml(tmp_path, {"key_env": "HK_TEST_KEY"}), capsys) == (0, "")
    for bad, msg in (
        ({"key_env": "A", "key_file": str(good)}, "exactly one of key_file and key_env"),
        ({}, "exactly one of key_file and key_env"),
        ({"key_file": "rel/key"}, "must be absolute"),
        ({"key_env": "BAD NAME"}, "should match pattern"),
        ({"key_env": "HAKEEPER_KEY"}, "names starting with HAKEEPER_ or PG are not passed on"),
        ({"key": "abc"}, "unknown field"),
    ):
        code, err = _load(_node_yaml(tmp_path, bad), capsys)
        assert code == 2 and msg in err and "backup.repositories.1.encryption" in err, (bad, err)


async def test_the_key_env_is_read_when_the_repository_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RepositoryConfig.model_validate(
        {"name": "e", "type": "fs", "path": str(tmp_path / "r"), "encryption": {"key_env": "HK_TEST_KEY2"}}
    )
    monkeypatch.setenv("HK_TEST_KEY2", base64.b64encode(KEY.master).decode())
    async with make_repository(cfg) as repo:
        await repo.initialize()
        await repo.put("x", b"hello")
    assert (tmp_path / "r/x").read_bytes()[8:24] == KEY.fingerprint
    monkeypatch.delenv("HK_TEST_KEY2")
    async with make_repository(cfg) as repo:
        with pytest.raises(RepoError, match=r"environment variable HK_TEST_KEY2 .* is not set"):
            await repo.get("x")


def test_sealing_a_large_object_does_not_block_for_long() -> None:
    """Throughput check of the format: 64 MiB sealed and opened well within a second each on
    any machine with AES instructions (a guard against an accidental quadratic buffer)."""
    data = os.urandom(64 << 20)
    t0 = time.monotonic()
    blob = _seal_in_pieces(KEY, "n", data, 1 << 20)
    t1 = time.monotonic()
    assert _feed(cipher.Opener(KEY, "n", "r"), blob, 1 << 20) == data
    t2 = time.monotonic()
    assert t1 - t0 < 5 and t2 - t1 < 5, (t1 - t0, t2 - t1)


def test_keygen_makes_keys_the_loader_takes_and_never_replaces_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import hakeeper.cli.backup_cmds  # noqa: F401  (registers the backup commands)

    runner = CliRunner()
    res = runner.invoke(app, ["backup", "keygen"])
    assert res.exit_code == 0, res.output
    assert len(base64.b64decode(res.stdout.strip(), validate=True)) == KEY_BYTES
    path = tmp_path / "repo.key"
    res = runner.invoke(app, ["backup", "keygen", "-o", str(path)])
    assert res.exit_code == 0, res.output
    assert path.stat().st_mode & 0o777 == 0o600
    key = read_key_file(path)
    res = runner.invoke(app, ["backup", "keygen", "-o", str(path)])
    assert res.exit_code == 2 and "File exists" in res.output
    assert read_key_file(path) == key
