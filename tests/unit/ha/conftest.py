from __future__ import annotations

from typing import Any

import pytest

from tests.support.sim import Sim


async def steady_cluster(monkeypatch: pytest.MonkeyPatch, **options: Any) -> Sim:
    """Three real agents (a, b, c) on the fakes, stepped until ``a`` leads and b and c stream from it."""
    sim = Sim(monkeypatch, **options)
    assert await sim.bootstrap() == "a"
    return sim


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> Sim:
    return await steady_cluster(monkeypatch)
