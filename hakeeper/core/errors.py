"""Refusals shared by every layer.

A request that cannot be carried out raises :class:`Refused` with a :class:`RefusalKind` that
says *why* in protocol-neutral terms; only ``hakeeper.api`` turns a kind into an HTTP status
(and the CLI into an exit code)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class RefusalKind(StrEnum):
    INVALID = "invalid"  # the request itself is wrong (bad value, already done)
    NOT_FOUND = "not_found"  # what the request names does not exist
    CONFLICT = "conflict"  # the state changed or another request is in the way
    PRECONDITION = "precondition"  # the cluster is not in a state where this is possible
    UNAVAILABLE = "unavailable"  # etcd or PostgreSQL cannot be reached, or cannot confirm


class Refused(Exception):
    """A request that cannot be carried out: ``kind`` says which sort, ``message`` says why."""

    def __init__(self, kind: RefusalKind, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.facts = facts


class BootstrapRefused(Exception):
    """A bootstrap from a backup copied nothing: the backup cannot be used now (retried later)."""


class BootstrapFailed(Exception):
    """A bootstrap from a backup failed while copying; the data directory has been emptied."""
