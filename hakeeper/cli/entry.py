"""The ``hakeeper`` executable (and ``python -m hakeeper``).

A CLI call spends most of its start-up importing (pydantic models, aiohttp, psycopg): objects
that live until the process ends.  With the garbage collector on, those imports trigger dozens
of collections that find nothing to free, and the interpreter's exit walks them all once more:
~0.1 s of every call (measured: 0.36 -> 0.29 s for ``backup create``'s imports and exit).  So
the collector is off while the command's modules are imported, and what they created is then
frozen (``gc.freeze()``: never scanned again); it is on for the command itself, agent included.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        from hakeeper.cli.main import prepare, run

        args = prepare(sys.argv[1:])
    finally:
        gc.freeze()
        gc.enable()
    run(args)
