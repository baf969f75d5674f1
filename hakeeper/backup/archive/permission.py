"""Whether this node may archive now, and why not: the caller's ``may_archive()`` and
``refusal_reason()``, asked so that neither can break the archiver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hakeeper.backup.archive import LOG_NAME
from hakeeper.util.log import get_logger

log = get_logger(LOG_NAME)


@dataclass(frozen=True, slots=True)
class Permission:
    """Asked before every push, probe, drain, gap record and marker (the package docstring)."""

    may_archive: Callable[[], bool]
    refusal_reason: Callable[[], str | None] | None = None

    def granted(self) -> bool:
        """``may_archive()``; a predicate that raises means no (a marker must never be wrong)."""
        try:
            return bool(self.may_archive())
        except Exception:
            log.exception("archive_predicate_failed")
            return False

    def reason(self) -> str | None:
        """Why archiving is refused, for the log and ``status()``."""
        if self.refusal_reason is None:
            return "may_archive() is false"
        try:
            return self.refusal_reason()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
