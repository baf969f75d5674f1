"""Free loopback ports for test servers (never the 5432/2379 defaults)."""

from __future__ import annotations

import random

from hakeeper.localcluster import port_is_free

_handed_out: set[int] = set()


def free_ports(count: int, lo: int = 20000, hi: int = 32000) -> list[int]:
    """``count`` distinct free ports in [lo, hi), never handed out twice in this process."""
    out: list[int] = []
    for _ in range(10000):
        p = random.randrange(lo, hi)
        if p in _handed_out or p in out:
            continue
        if port_is_free(p):
            out.append(p)
            if len(out) == count:
                _handed_out.update(out)
                return out
    raise RuntimeError("no free ports")
