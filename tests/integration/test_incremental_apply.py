"""The in-place application of an incremental chain against pg_combinebackup, byte for byte.

A real server of the major under test (17 or 18; skipped on 15, which has no incremental
backups) with summarize_wal: a full backup, then rounds of changes each followed by
``pg_basebackup --incremental`` -- UPDATEs over a range, INSERTs that extend a table, a new
table, a DROP TABLE, a DELETE + VACUUM that truncates a table's tail then INSERTs that extend it
again (in the next round, and in one round), a TRUNCATE, a VACUUM FULL, a database created and
dropped.  For chains of 2, 3 and 4 links: ``pg_combinebackup --copy`` into A, the full copied
into B and :func:`apply_chain` of the links there; A and B hold the same files and directories
with the same bytes (A's backup_manifest aside: B has none), and B starts and holds the rows
the server had when the newest link was taken.

Then hand-made incremental files (random truncation lengths and block sets, including an older
link's truncation length below the newest's and a whole copy with a partial last block) in a
real chain's links, combined both ways: the rule for which block comes from where is
pg_combinebackup's, not one that merely agrees on what real servers happen to produce."""

from __future__ import annotations

import filecmp
import hashlib
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.backup.incremental_apply import BLCKSZ, INCREMENTAL_MAGIC, ApplyStats, apply_chain
from hakeeper.localcluster import pgbuilds
from hakeeper.util.proc import RunAs, resolve_run_as
from tests.support.pg import PgArea, bin_dir_under_test
from tests.support.ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.matrix]

MAJOR = pgbuilds.default_major()
skip_15 = pytest.mark.skipif(MAJOR < 17, reason=f"PostgreSQL {MAJOR} has no incremental backups")


@dataclass
class Server:
    area: PgArea
    bin_dir: Path
    run_as: RunAs
    data: Path
    sock: Path
    port: int

    def cmd(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL program run as its OS user."""
        root = os.geteuid() == 0
        return subprocess.run(
            [str(self.bin_dir / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            check=check,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            user=self.run_as.uid if root else None,
            group=self.run_as.gid if root else None,
            extra_groups=[] if root else None,
            timeout=300,
        )

    def sql(self, query: str, port: int | None = None, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(
            host=str(self.sock), port=port or self.port, user="postgres", dbname=dbname, autocommit=True
        ) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def backup(self, name: str, parent: str | None, checksums: str) -> Path:
        out = self.area.root / name
        argv = ["pg_basebackup", "-h", str(self.sock), "-p", str(self.port), "-U", "postgres"]
        argv += ["-D", str(out), "-Fp", "-X", "fetch", "-c", "fast", f"--manifest-checksums={checksums}"]
        if parent is not None:
            argv.append(f"--incremental={self.area.root / parent / 'backup_manifest'}")
        self.cmd(*argv)
        return out


def fingerprint(s: Server, port: int | None = None) -> dict[str, Any]:
    """Every table of the postgres database (row count and a digest of its rows) and the
    databases: what a restored copy must hold."""
    tables = s.sql(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1",
        port,
    )
    rows = {
        t: s.sql(
            f"SELECT count(*), md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x", port
        )
        for (t,) in tables
    }
    return {"tables": rows, "databases": s.sql("SELECT datname::text FROM pg_database ORDER BY 1", port)}


def size(s: Server, table: str) -> int:
    return int(s.sql(f"SELECT pg_relation_size('{table}')")[0][0])


@dataclass
class Chain:
    server: Server
    links: list[Path]  # full first
    expected: list[dict[str, Any]]  # the fingerprint when each link was taken
    evidence: dict[str, Any]


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    if MAJOR < 17:
        pytest.skip(f"PostgreSQL {MAJOR} has no incremental backups")
    area = PgArea()
    try:
        ra = resolve_run_as(area.root / "x")
        sock = area.root / "sock"
        for d in (area.root, sock):
            d.mkdir(exist_ok=True)
            if ra.uid is not None:
                os.chown(d, ra.uid, ra.gid or -1)
        (port,) = free_ports(1)
        s = Server(area, bin_dir_under_test(), ra, area.root / "src", sock, port)
        area.data_dirs.append(s.data)
        s.cmd(
            "initdb",
            "-D",
            str(s.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--data-checksums",
            "--locale=C",
            "--encoding=UTF8",
        )
        with open(s.data / "postgresql.conf", "a") as f:
            # Unix socket only (no TCP port taken); fsync off: crash safety is not under test.
            f.write(
                f"listen_addresses = ''\nunix_socket_directories = '{sock}'\nport = {port}\n"
                "summarize_wal = on\nwal_level = replica\nfsync = off\nautovacuum = off\n"
            )
        s.cmd("pg_ctl", "-D", str(s.data), "-l", str(area.root / "src.log"), "-w", "start")
        yield _build_chain(s)
    finally:
        area.cleanup()


def _build_chain(s: Server) -> Chain:
    ev: dict[str, Any] = {}
    s.sql(
        "CREATE TABLE acc (id int PRIMARY KEY, v text);"
        "INSERT INTO acc SELECT g, repeat('a', 80) FROM generate_series(1, 30000) g;"
        "CREATE TABLE tail (id int PRIMARY KEY, v text);"
        "INSERT INTO tail SELECT g, repeat('t', 200) FROM generate_series(1, 10000) g;"
        "CREATE TABLE gone1 (id int); INSERT INTO gone1 SELECT generate_series(1, 3000);"
        "CREATE TABLE trunc1 (id int, v text);"
        "INSERT INTO trunc1 SELECT g, 'x' FROM generate_series(1, 5000) g;"
        "CREATE TABLE rewrite1 (id int, v text);"
        "INSERT INTO rewrite1 SELECT g, 'r' FROM generate_series(1, 5000) g;"
    )
    links = [s.backup("full", None, "SHA256")]
    expected = [fingerprint(s)]

    # Round 1: an UPDATE over a range, INSERTs extending a table, a new table, a dropped one,
    # a DELETE + VACUUM truncating a table's tail, a new database.
    s.sql("UPDATE acc SET v = repeat('b', 80) WHERE id BETWEEN 1000 AND 4000")
    s.sql("INSERT INTO acc SELECT g, 'new' FROM generate_series(30001, 36000) g")
    s.sql(
        "CREATE TABLE new1 (id int, v text); INSERT INTO new1 SELECT g, 'n' FROM generate_series(1, 2000) g"
    )
    s.sql("DROP TABLE gone1")
    before = size(s, "tail")
    s.sql("DELETE FROM tail WHERE id > 4000")
    s.sql("VACUUM tail")
    ev["tail_truncated"] = (before, size(s, "tail"))
    s.sql("CREATE DATABASE db2")
    s.sql("CREATE TABLE in_db2 AS SELECT generate_series(1, 1000) AS id", dbname="db2")
    links.append(s.backup("inc1", "full", "CRC32C"))
    expected.append(fingerprint(s))

    # Round 2: the truncated table extended again, a TRUNCATE (a new file), the database dropped.
    before = size(s, "tail")
    s.sql("INSERT INTO tail SELECT g, repeat('u', 200) FROM generate_series(4001, 9000) g")
    ev["tail_extended"] = (before, size(s, "tail"))
    s.sql("TRUNCATE trunc1")
    s.sql("INSERT INTO trunc1 VALUES (1, 'after the truncate')")
    s.sql("DROP DATABASE db2")
    s.sql("UPDATE acc SET v = 'c' WHERE id % 97 = 0")
    links.append(s.backup("inc2", "inc1", "SHA256"))
    expected.append(fingerprint(s))

    # Round 3: truncated and extended again within one round, a table rewritten (VACUUM FULL),
    # another dropped, more updates.
    before = size(s, "tail")
    s.sql("DELETE FROM tail WHERE id > 2000")
    s.sql("VACUUM tail")
    mid = size(s, "tail")
    s.sql("INSERT INTO tail SELECT g, 'v' FROM generate_series(2001, 2600) g")
    ev["tail_truncated_and_extended"] = (before, mid, size(s, "tail"))
    s.sql("VACUUM FULL rewrite1")
    s.sql("DROP TABLE new1")
    s.sql("UPDATE acc SET v = 'd' WHERE id BETWEEN 20000 AND 20500")
    links.append(s.backup("inc3", "inc2", "CRC32C"))
    expected.append(fingerprint(s))
    return Chain(s, links, expected, ev)


def _tree(root: Path) -> tuple[set[str], set[str]]:
    files: set[str] = set()
    dirs: set[str] = set()
    for d, subdirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        dirs.update(os.path.normpath(os.path.join(rel, n)) for n in subdirs)
        files.update(os.path.normpath(os.path.join(rel, n)) for n in names)
    return files, dirs


def assert_same_tree(a: Path, b: Path) -> int:
    """A (pg_combinebackup's output) and B (ours): same files, same directories, same bytes;
    returns how many files were compared."""
    fa, da = _tree(a)
    fb, db = _tree(b)
    assert "backup_manifest" in fa and "backup_manifest" not in fb
    fa.discard("backup_manifest")
    assert sorted(fa - fb) == [] and sorted(fb - fa) == []
    assert sorted(da ^ db) == []
    differ = [f for f in sorted(fa) if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert differ == []
    return len(fa)


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@skip_15
@pytest.mark.parametrize("n_links", [2, 3, 4])
def test_chain_applied_in_place_equals_pg_combinebackup(chain: Chain, n_links: int) -> None:
    s = chain.server
    before, after = chain.evidence["tail_truncated"]
    assert after < before, f"VACUUM did not truncate tail ({before} -> {after}): the case is not tested"
    assert chain.evidence["tail_extended"][1] > chain.evidence["tail_extended"][0]
    b3, m3, a3 = chain.evidence["tail_truncated_and_extended"]
    assert m3 < b3 and a3 > m3
    links = chain.links[:n_links]
    work = s.area.root / f"work{n_links}"
    work.mkdir()
    if s.run_as.uid is not None:
        os.chown(work, s.run_as.uid, s.run_as.gid or -1)
    a = work / "A"
    s.cmd("pg_combinebackup", "--copy", "-o", str(a), *map(str, links))

    b = copy_tree(links[0], work / "B")
    stage = [copy_tree(link, work / f"stage-{link.name}") for link in links[1:]]
    stats = apply_chain(b, stage, s.run_as)
    assert_stats(stats, n_links)
    compared = assert_same_tree(a, b)
    assert compared > 900

    # B is a working data directory with the rows the server had when the newest link was taken.
    (port,) = free_ports(1)
    s.area.data_dirs.append(b)
    opts = f"-p {port} -c unix_socket_directories={s.sock} -c listen_addresses=''"
    s.cmd("pg_ctl", "-D", str(b), "-l", str(work / "b.log"), "-o", opts, "-w", "-t", "120", "start")
    try:
        assert fingerprint(s, port) == chain.expected[n_links - 1]
        assert s.sql("SELECT pg_is_in_recovery()", port) == [(False,)]
    finally:
        s.cmd("pg_ctl", "-D", str(b), "-m", "fast", "-w", "stop", check=False)


def assert_stats(stats: ApplyStats, n_links: int) -> None:
    """What the rounds make the application do (so that a no-op could not pass)."""
    assert stats.links == n_links
    assert stats.files_rebuilt > 100 and stats.blocks_written > 50
    assert stats.files_moved > 10
    assert stats.files_removed >= 1  # gone1 (round 1), the full's WAL
    assert stats.checksums_compared > 0  # the full's files are SHA256-checked before a rebuild
    if n_links == 2:
        assert stats.dirs_created >= 1  # db2's directory (round 1) ...
    else:
        assert stats.dirs_created == 0  # ... dropped again in round 2: never created in B


# ============================================================================ hand-made headers


def write_incremental(path: Path, trunc: int, blocks: dict[int, bytes]) -> None:
    nums = list(blocks)
    head = struct.pack(f"<III{len(nums)}I", INCREMENTAL_MAGIC, len(nums), trunc, *nums)
    if nums:
        head += b"\0" * (-len(head) % BLCKSZ)
    path.write_bytes(head + b"".join(blocks[b] for b in nums))


def set_manifest_sizes(link: Path, sizes: dict[str, int]) -> None:
    """New sizes in a link's manifest (checksums switched off for those files) and its own
    checksum recomputed: both tools read the manifests."""
    mf = link / "backup_manifest"
    lines = mf.read_text().split("\n")
    for i, line in enumerate(lines):
        for path, n in sizes.items():
            if line.startswith(f'{{ "Path": "{path}", '):
                mtime = line.split('"Last-Modified": "', 1)[1].split('"', 1)[0]
                tail = "," if line.rstrip().endswith(",") else ""
                lines[i] = f'{{ "Path": "{path}", "Size": {n}, "Last-Modified": "{mtime}" }}{tail}'
    text = "\n".join(lines)
    cut = text.rfind('"Manifest-Checksum"')
    cut = text.rfind("\n", 0, cut) + 1
    digest = hashlib.sha256(text[:cut].encode()).hexdigest()
    mf.write_text(text[:cut] + f'"Manifest-Checksum": "{digest}"}}\n')


def block(tag: int, rng: random.Random) -> bytes:
    return bytes([tag]) * 16 + rng.randbytes(BLCKSZ - 16)


@skip_15
def test_hand_made_headers_combine_like_pg_combinebackup(chain: Chain) -> None:
    """Relation files of a real 3-link chain replaced by hand-made versions, combined both ways:
    equal bytes for every case, among them the ones real servers rarely produce."""
    s = chain.server
    full, inc1, inc2 = chain.links[:3]
    candidates = sorted(
        f"{d}/{n.removeprefix('INCREMENTAL.')}"
        for d in ("base/5", "global")
        for n in os.listdir(inc2 / d)
        if n.startswith("INCREMENTAL.")
        and (inc1 / d / n).exists()
        and (full / d / n.removeprefix("INCREMENTAL.")).exists()
    )
    assert len(candidates) >= 20
    rng = random.Random(14)
    # (full's blocks, full's extra bytes, (T, blocks) of inc1, (T, blocks) of inc2)
    fixed: list[tuple[int, int, tuple[int, list[int]], tuple[int, list[int]]]] = [
        (8, 0, (2, [3]), (6, [7])),  # an older truncation length below the newest's
        (5, 100, (9, []), (9, [1])),  # a whole copy with a partial last block, shorter than T
        (6, 0, (6, [0, 5]), (0, [2])),  # the newest truncates to nothing and writes one block
        (0, 0, (3, [0, 1, 2]), (4, [])),  # an empty whole copy
        (10, 0, (12, [11, 4]), (3, [10, 1])),  # blocks past the newest's T from an older link
    ]
    for seed in range(3):
        picked = rng.sample(candidates, 8)
        work = s.area.root / f"hand{seed}"
        work.mkdir()
        if s.run_as.uid is not None:
            os.chown(work, s.run_as.uid, s.run_as.gid or -1)
        links = [copy_tree(p, work / p.name) for p in (full, inc1, inc2)]
        sizes: list[dict[str, int]] = [{}, {}, {}]
        for k, rel in enumerate(picked):
            if seed == 0 and k < len(fixed):
                nfull, extra, (t1, b1), (t2, b2) = fixed[k]
            else:
                nfull, extra = rng.randrange(0, 14), rng.choice([0, 0, 0, 300])
                t1, b1 = rng.randrange(0, 16), rng.sample(range(16), rng.randrange(0, 6))
                t2, b2 = rng.randrange(0, 16), rng.sample(range(16), rng.randrange(0, 6))
            head, _, name = rel.rpartition("/")
            whole = b"".join(block(1, rng) for _ in range(nfull)) + rng.randbytes(extra)
            (links[0] / rel).write_bytes(whole)
            sizes[0][rel] = len(whole)
            for i, (t, bs) in ((1, (t1, b1)), (2, (t2, b2))):
                p = links[i] / head / f"INCREMENTAL.{name}"
                write_incremental(p, t, {b: block(10 * i + b % 10, rng) for b in bs})
                sizes[i][f"{head}/INCREMENTAL.{name}"] = p.stat().st_size
        for link, sz in zip(links, sizes, strict=True):
            set_manifest_sizes(link, sz)
        if s.run_as.uid is not None:
            subprocess.run(["chown", "-R", f"{s.run_as.uid}:{s.run_as.gid}", str(work)], check=True)
        a = work / "A"
        s.cmd("pg_combinebackup", "--copy", "-o", str(a), *map(str, links))
        apply_chain(links[0], links[1:], s.run_as)
        for rel in picked:
            assert (a / rel).read_bytes() == (links[0] / rel).read_bytes(), f"seed {seed}: {rel}"
        assert_same_tree(a, links[0])
