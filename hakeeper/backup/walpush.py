"""One-shot ``archive_command`` helper: store one WAL file in every repository.

    python -m hakeeper.backup.walpush --config WALCONF.json %p %f

Exit 0 only when the file is durable in every repository (an identical copy already there
counts); 1 otherwise (PostgreSQL keeps the file and retries).  Different content under the same
name is never overwritten: it is quarantined and the push fails.  This starts a Python process
per segment; the agent's asynchronous archiver (:mod:`hakeeper.backup.archive`) is the fast
path, this is the simple one (tests, tools, a node without an agent).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


async def push(conf_path: Path, path: Path, fname: str) -> tuple[int, str]:
    from hakeeper.backup import layout
    from hakeeper.backup.errors import RepoError
    from hakeeper.backup.repos import make_repository
    from hakeeper.core.backup_config import WalToolConfig

    conf = WalToolConfig.load(conf_path)
    key = layout.wal_key(conf.scope, fname)
    data = await asyncio.to_thread(path.read_bytes)

    async def one(rc: object) -> str | None:
        from hakeeper.core.backup_config import RepositoryConfig

        assert isinstance(rc, RepositoryConfig)
        repo = make_repository(rc)
        try:
            await repo.put_unique(key, data)
            return None
        except RepoError as e:
            return f"{rc.name}: {e}"
        finally:
            await repo.close()

    errors = [e for e in await asyncio.gather(*(one(rc) for rc in conf.repositories)) if e]
    if errors:
        return 1, f"{fname}: " + "; ".join(errors)
    return 0, f"{fname}: archived"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hakeeper-walpush", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("path", type=Path)
    p.add_argument("fname")
    a = p.parse_args(argv)
    try:
        code, msg = asyncio.run(push(a.config, a.path, a.fname))
    except Exception as e:
        code, msg = 1, f"{a.fname}: {type(e).__name__}: {e}"
    if code:
        print(f"hakeeper walpush: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
