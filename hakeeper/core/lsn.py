"""PostgreSQL LSNs: psycopg returns them as text ``'X/Y'``; we compare them as integers."""

from __future__ import annotations


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` -> 97500059720; None stays None."""
    if text is None:
        return None
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) + int(lo, 16)


def format_lsn(value: int) -> str:
    if value < 0:
        raise ValueError("an LSN is never negative")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
