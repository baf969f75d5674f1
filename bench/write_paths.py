"""How fast this machine takes a restore's writes: decompress zstd parts and write the content
into 1 GiB files, through the page cache or with O_DIRECT, from N threads, then syncfs.

Not a comparison with a peer (bench/restore_speed.py is): the measurement behind the choice of
O_DIRECT for restore writes (docs/decisions.md, "Restore writes whole blocks with O_DIRECT").
The data is synthetic, pgbench-like rows (highly compressible, as pgbench's are), so the
decompression costs about what a restore's does and the disk does the rest.

    python -m bench.write_paths --gb 9 --jobs 2 [--dir /tmp] [--runs 2]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import zstandard

PART = 64 << 20
SEGMENT = 1 << 30
CHUNK = 8 << 20


def sample_part() -> bytes:
    rows = b"".join(b"%10d|%6d|%10d|" % (i, i % 600, 0) + b" " * 84 for i in range(PART // 112 + 1))
    zc = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    return zc.compress(rows[:PART])


def run(mode: str, jobs: int, gb: float, where: Path, blob: bytes) -> tuple[float, float]:
    """Seconds writing and seconds of the final sync."""
    d = Path(tempfile.mkdtemp(prefix="write-paths-", dir=where))
    parts = int(gb * (1 << 30) / PART)
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        dctx = zstandard.ZstdDecompressor()
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= parts:
                    return
                off = i * PART
                flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if mode == "direct" else 0)
                fd = os.open(d / f"seg{off // SEGMENT}", flags, 0o600)
                try:
                    reader = dctx.stream_reader(blob)
                    at = off % SEGMENT
                    for _ in range(PART // CHUNK):
                        got = 0
                        while got < CHUNK:
                            got += reader.readinto(view[got:])
                        os.pwrite(fd, view, at)
                        at += CHUNK
                finally:
                    os.close(fd)
        except BaseException as e:
            errors.append(e)
        finally:
            view.release()
            buf.close()

    os.sync()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.monotonic()
    os.sync()
    t2 = time.monotonic()
    shutil.rmtree(d)
    if errors:
        raise errors[0]
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=9.0, help="GiB written per run")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    blob = sample_part()
    print(f"{a.gb} GiB in 64 MiB zstd parts (ratio {PART / len(blob):.0f}x), {a.jobs} threads, into {a.dir}")
    for r in range(a.runs):
        for mode in ("buffered", "direct"):
            w, s = run(mode, a.jobs, a.gb, a.dir, blob)
            total = w + s
            print(
                f"run {r + 1} {mode:8s}: write {w:6.2f} s, sync {s:5.2f} s, "
                f"{a.gb * (1 << 30) / total / 1e9:5.2f} GB/s"
            )


if __name__ == "__main__":
    main()
