"""Errors of the backup repositories.

The split that matters to callers is *definitely absent* versus *cannot tell now*: a WAL fetch
must answer "not found" only on :class:`NotFound`, and treat every other :class:`RepoError`
(above all :class:`RepoUnavailable`) as "try again", or recovery would end early.
"""

from __future__ import annotations


class RepoError(Exception):
    """Any repository failure.  Anything but :class:`NotFound` means "the answer is not known"."""


class NotFound(RepoError):
    """The object does not exist (the repository itself answered and said so)."""

    def __init__(self, repo: str, name: str) -> None:
        self.repo = repo
        self.name = name
        super().__init__(f"{repo}: {name}: no such object")


class RepoUnavailable(RepoError):
    """The repository could not be reached or did not answer properly (connection refused,
    timeout, 5xx, throttling, missing bucket or root directory, denied access): try again later."""


class CorruptObject(RepoError):
    """An object exists but its content does not match its recorded checksum or format."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: corrupt object: {reason}")


class ContentConflict(RepoError):
    """``put_unique`` found an object of that name with other content.

    The existing object was left alone; the new content was stored as ``quarantined``.
    ``existing_sha256`` is None when the existing object could not be read (it is corrupt).
    """

    def __init__(
        self, repo: str, name: str, quarantined: str, existing_sha256: str | None, new_sha256: str
    ) -> None:
        self.repo = repo
        self.name = name
        self.quarantined = quarantined
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256
        super().__init__(
            f"{repo}: {name} exists with other content (sha256 {existing_sha256 or 'unreadable'}, "
            f"new {new_sha256}); kept the existing object, stored the new content as {quarantined}"
        )


class WrongKey(RepoError):
    """An object was sealed with another key than the repository's configured one."""

    def __init__(self, repo: str, name: str, found: str, configured: str) -> None:
        self.repo = repo
        self.name = name
        self.found = found
        self.configured = configured
        super().__init__(
            f"repository {repo}: object {name} was encrypted with another key (fingerprint {found}; "
            f"the configured key's fingerprint is {configured})"
        )


class EncryptionMismatch(RepoError):
    """An encrypted object (or repository) read without a key, or a plain one where the
    configuration says the repository is encrypted: a configuration error, not damage."""


class AuthenticationFailed(CorruptObject):
    """An encrypted object failed authentication: it was altered, truncated, reordered or
    stored under another name than the one it was sealed for."""

    def __init__(self, repo: str, name: str, detail: str) -> None:
        self.repo = repo
        super().__init__(name, f"authentication failed in repository {repo}: {detail}")
