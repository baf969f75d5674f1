"""A light write load for tests and benchmarks: one single-row INSERT at a fixed interval
through a (multi-host, read-write) DSN, every acknowledged id kept with its time."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg


class RowWriter(threading.Thread):
    """INSERTs ``id`` values 1, 2, ... into ``table`` every ``every`` seconds until ``stop`` is
    set; ``acked``: (id, monotonic time of the acknowledgement); ``failures``: attempts that
    failed (the connection is made again at the next one)."""

    def __init__(self, dsn: str, table: str = "t", every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.sql = f"INSERT INTO {table} (id) VALUES (%s)"
        self.every = every
        self.acked: list[tuple[int, float]] = []
        self.failures = 0
        self.stop = threading.Event()

    @property
    def ids(self) -> set[int]:
        return {i for i, _ in self.acked}

    def run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                conn.execute(self.sql, (n,))
                self.acked.append((n, time.monotonic()))
            except psycopg.Error:
                self.failures += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
            time.sleep(self.every)
        if conn is not None:
            conn.close()
