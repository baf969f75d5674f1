"""structlog set-up: one JSON or console line per event, stdlib records included.

Events are named ``noun_verb`` and carry their facts as key-value pairs.  Secrets never reach a
log, even on error paths:

* tracebacks carry **no frame locals** (structlog's dict tracebacks and rich tracebacks show
  them by default, and locals are where passwords, conninfos and ``PGPASSWORD`` environments
  live): JSON logs use ``ExceptionDictTransformer(show_locals=False)``, console logs the plain
  standard-library traceback;
* values under sensitive keys (``password``, ``token``, ``secret``, ...) are masked, at any depth;
* every string logged, nested in dicts and lists and the exception text included, goes through
  :func:`redact`, which masks the password of URLs (``postgresql://user:pw@``), ``key=value`` and
  ``"key": "value"`` pairs whose key names a secret (conninfo ``password=``, ``PGPASSWORD=``,
  repr of an environment dict), ``Authorization`` credentials, and the values of the node's
  configured secrets wherever they appear (:func:`register_secrets`).

Masking errs on the side of hiding too much: an unquoted value runs to the next whitespace.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import structlog
from pydantic import BaseModel, SecretStr
from structlog.tracebacks import ExceptionDictTransformer
from structlog.types import EventDict, Processor

MASK = "***"
_SENSITIVE = ("password", "passwd", "token", "secret", "private_key", "api_key", "apikey")
_MAX_DEPTH = 20  # nested structures deeper than this are replaced, not walked

# scheme://user:password@ -- the password runs to the *last* '@' before whitespace, so an
# unencoded '@' or '/' in it is still hidden (over-masking a path is the price).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):[^\s]*@")
# A key that names a secret, optionally quoted: PGPASSWORD, "password", 'sslpassword', api_token...
_KEY = r"""["']?[\w.\-]*(?:password|passwd|token|secret|private_key|api_key|apikey)[\w.\-]*["']?"""
_QUOTED = r"""'(?:\\[\s\S]|[^'\\])*'?|"(?:\\[\s\S]|[^"\\])*"?"""
# key=value (conninfo, environment, kwargs): libpq ends an unquoted value at whitespace only, and
# a quote is an ordinary character inside one, so whatever is glued to a quoted part belongs to
# the value too ('"0"0' is one password).  An unterminated quote hides the rest of the text.
_KEY_EQUALS = re.compile(rf"(?i)({_KEY}\s*=\s*)(?:(?:{_QUOTED})\S*|(?:\\[\s\S]|[^\s\\])+\\?)")
# key: value (JSON, repr of a dict, YAML, headers): a quoted value ends at its closing quote.
_KEY_COLON = re.compile(rf"(?i)({_KEY}\s*:\s*)(?:{_QUOTED}|(?:\\[\s\S]|[^\s\\])+\\?)")
# Authorization: Bearer <token> / Basic <base64>
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s,;]+")


MIN_KNOWN_SECRET = 6  # shorter known secrets are left to the patterns (masking "pw" everywhere
# would garble every log line)
_known: tuple[str, ...] = ()  # the configured secrets' values, longest first


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these values wherever they appear in a log line from now on (the node's configured
    passwords, tokens and keys: a last line of defence for texts no pattern recognises)."""
    global _known
    found = {v for v in values if v and len(v) >= MIN_KNOWN_SECRET}
    found |= {quote(v, safe="") for v in found}  # as they appear in URLs
    _known = tuple(sorted(found | set(_known), key=len, reverse=True))


def secrets_of(model: BaseModel) -> list[str]:
    """Every ``SecretStr`` value in a (nested) pydantic model."""
    out: list[str] = []
    stack: list[Any] = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, SecretStr):
            out.append(item.get_secret_value())
        elif isinstance(item, BaseModel):
            stack.extend(getattr(item, name) for name in type(item).model_fields)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return out


def redact(text: str) -> str:
    """``text`` with every password, token and secret it may carry replaced by ``***``."""
    if not text:
        return text
    text = _URL_USERINFO.sub(rf"\1:{MASK}@", text)
    text = _KEY_EQUALS.sub(rf"\1{MASK}", text)
    text = _KEY_COLON.sub(rf"\1{MASK}", text)
    text = _AUTH_SCHEME.sub(rf"\1\2{MASK}", text)
    for secret in _known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _sensitive(key: object) -> bool:
    return isinstance(key, str) and any(s in key.lower() for s in _SENSITIVE)


def _scrub(value: Any, depth: int = 0, render: Callable[[object], str] = repr) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {k: MASK if _sensitive(k) else _scrub(v, depth + 1, render) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, depth + 1, render) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("utf-8", "backslashreplace"))
    if value is None or isinstance(value, bool | int | float):
        return value
    # Anything else would be rendered as text later (repr() in logs): render it now, masked.
    return redact(render(value))


def redact_values(value: Any) -> Any:
    """``value`` (JSON-like) with every string redacted and values under secret keys masked;
    other objects as their ``str()``, redacted."""
    return _scrub(value, render=str)


def _mask_secrets(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """Mask values under sensitive keys (top level, before any other processing)."""
    for key in list(event):
        if _sensitive(key):
            event[key] = MASK
    return event


def _redact_values(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """Value-based masking of every string in the event, after the exception is rendered to
    text or dicts (so the exception message and notes are masked too)."""
    for key, value in list(event.items()):
        if key in ("exc_info", "stack_info") and not isinstance(value, str):
            continue  # not rendered (a formatter upstream turned them into text already)
        event[key] = MASK if _sensitive(key) else _scrub(value)
    return event


def setup_logging(fmt: str = "console", level: str = "INFO", stream: Any = None) -> None:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _mask_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[Processor]
    if fmt == "json":
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Frames without their locals (structlog shows them by default).
            structlog.processors.ExceptionRenderer(
                ExceptionDictTransformer(show_locals=False, use_rich=False)
            ),
            _redact_values,
            structlog.processors.JSONRenderer(),
        ]
    else:
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The plain standard-library traceback (no locals), as text that _redact_values masks
            # before the renderer prints it (the renderer's own rich traceback shows locals).
            structlog.processors.format_exc_info,
            _redact_values,
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
        ]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
