"""The one exception type of the PostgreSQL layer."""

from __future__ import annotations


class PgError(Exception):
    """A PostgreSQL operation failed; the message says what and includes the relevant log tail.

    For a failed SQL statement ``sqlstate`` is the server's error code (e.g. ``"25006"``, read-only
    transaction) and ``__cause__`` the original psycopg exception.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
