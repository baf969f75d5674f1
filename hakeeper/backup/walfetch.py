"""``restore_command`` helper: fetch one archived WAL file from a repository.

    python -m hakeeper.backup.walfetch --config WALCONF.json %f %p

Exit status, as PostgreSQL reads it: 0 the file is at ``%p``; 1 it is in no repository (a
plain "not found": recovery asks for files that do not exist, e.g. the next ``.history``);
200 the answer is unknown (a repository unreachable after retries, or every copy corrupt).
A status above 125 makes PostgreSQL stop recovery with an error instead of treating the file as
missing and ending recovery early, which would silently lose the rest of the WAL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_UNKNOWN = 200
ATTEMPTS = 4


async def fetch(conf_path: Path, fname: str, dest: Path) -> tuple[int, str]:
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

    from hakeeper.backup import layout
    from hakeeper.backup.config import WalToolConfig, make_repository
    from hakeeper.backup.errors import CorruptObject, NotFound, RepoError

    conf = WalToolConfig.load(conf_path)
    key = layout.wal_key(conf.scope, fname)
    problems: list[str] = []
    for rc in conf.repositories:
        repo = make_repository(rc)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(
                    lambda e: isinstance(e, RepoError) and not isinstance(e, (NotFound, CorruptObject))
                ),
                stop=stop_after_attempt(ATTEMPTS),
                wait=wait_exponential(multiplier=0.5, max=4),
                reraise=True,
            ):
                with attempt:
                    data = await repo.get(key)
        except NotFound:
            continue
        except CorruptObject as e:
            problems.append(f"{rc.name}: {e}")
            continue
        except RepoError as e:
            problems.append(f"{rc.name}: {e}")
            continue
        finally:
            await repo.close()
        await asyncio.to_thread(_write, dest, data)
        return EXIT_OK, f"{fname}: restored from {rc.name}"
    if problems:
        return EXIT_UNKNOWN, f"{fname}: not fetched: " + "; ".join(problems)
    return EXIT_NOT_FOUND, f"{fname}: not in the archive"


def _write(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(dest.name + ".hakeeper-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hakeeper-walfetch", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("fname")
    p.add_argument("dest", type=Path)
    a = p.parse_args(argv)
    try:
        code, msg = asyncio.run(fetch(a.config, a.fname, a.dest))
    except Exception as e:  # anything unexpected must not read as "not found"
        code, msg = EXIT_UNKNOWN, f"{a.fname}: {type(e).__name__}: {e}"
    if code != EXIT_NOT_FOUND or not a.fname.endswith(".history"):
        print(f"hakeeper walfetch: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
