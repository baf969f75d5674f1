"""ISO 8601 renderings of instants, in UTC: one function for every place that shows a time."""

from __future__ import annotations

import datetime as dt
from typing import Literal, overload

TimeSpec = Literal["auto", "seconds", "milliseconds"]


@overload
def iso(when: dt.datetime, *, timespec: TimeSpec = "auto", zulu: bool = True) -> str: ...
@overload
def iso(
    when: float | dt.datetime | None, *, timespec: TimeSpec = "auto", zulu: bool = True
) -> str | None: ...


def iso(when: float | dt.datetime | None, *, timespec: TimeSpec = "auto", zulu: bool = True) -> str | None:
    """``when`` (epoch seconds or an aware datetime) in UTC, ``...Z`` (or ``...+00:00`` without
    ``zulu``).  None, and epoch values no datetime can hold, give None."""
    if when is None:
        return None
    if isinstance(when, dt.datetime):
        t = when.astimezone(dt.UTC)
    else:
        try:
            t = dt.datetime.fromtimestamp(when, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return None
    text = t.isoformat(timespec=timespec)
    return text.replace("+00:00", "Z") if zulu else text
