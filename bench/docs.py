"""Writing a benchmark's section into docs/benchmarks.md (between its start and end marks)."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the text between ``start`` and ``end`` in ``path`` by ``section`` (appended, with
    its marks, when the file has none; the file is created if missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
