"""Repository encryption keys: read from a file or an environment variable (issue 12, finding 7).

A key is 32 random bytes.  Its text form is base64 (44 characters, one line): what
``hakeeper backup keygen`` prints and what an environment variable holds.  A key *file* may hold
either that text (a trailing newline is fine) or the 32 raw bytes (``head -c 32 /dev/urandom``).
The two never get confused: raw keys are exactly 32 bytes long, base64 ones 44 or 45.

A key file must not be readable by group or others (the key decrypts every backup); one that is
is refused, as OpenSSH refuses a private key file with loose permissions.

Errors are :class:`ValueError` with a message meant for the user (the configuration loader adds
the file and field).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
from pathlib import Path

KEY_BYTES = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def new_key_text() -> str:
    """A fresh random key in its text form (base64, no newline)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def decode_key_text(text: str, where: str) -> bytes:
    """The key that base64 ``text`` holds; ValueError naming ``where`` if it is not one."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} is not a base64 key (make one with `hakeeper backup keygen`)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where} holds {len(key)} bytes; a key is {KEY_BYTES} (base64: 44 characters)")
    return key


def read_key_file(path: Path) -> bytes:
    """The key in ``path``: checked to be a regular file not readable by group or others."""
    try:
        # O_NOFOLLOW is not wanted: a key kept on a mounted secret volume is often a symbolic
        # link (Kubernetes); fstat of the opened file checks what is actually read.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"key file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ValueError(
                f"key file {path} is accessible by group or others (mode {mode:04o}); "
                f"`chmod 600 {path}`: it decrypts every backup of the repository"
            )
        data = f.read(1024)
    if len(data) == KEY_BYTES:
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"key file {path} holds {len(data)} bytes: neither a raw {KEY_BYTES}-byte key nor base64 text"
        ) from None
    return decode_key_text(text, f"key file {path}")


def read_key_env(name: str) -> bytes:
    """The key in environment variable ``name`` (base64 text)."""
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    text = os.environ.get(name)
    if text is None:
        raise ValueError(f"environment variable {name} (the key) is not set")
    return decode_key_text(text, f"environment variable {name}")


def load_key(key_file: Path | None, key_env: str | None) -> bytes:
    """The key from whichever source is given (exactly one must be)."""
    if (key_file is None) == (key_env is None):
        raise ValueError("give exactly one of key_file and key_env")
    return read_key_file(key_file) if key_file is not None else read_key_env(str(key_env))
