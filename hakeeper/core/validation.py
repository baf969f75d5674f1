"""Every error of a configuration in one pass.

Pydantic runs a model's ``mode="after"`` validators (duplicate repository names, a schedule
naming an unknown repository, ...) only once every field of that model is valid, so a user who
fixes the errors shown sees a second wave of them.  A model that wants its cross-field checks
reported together with the field errors wraps its validation with :func:`validate_collecting`
and gives a *raw check*: the same checks, written against the raw input (dicts and lists as
loaded from YAML), which runs only when the normal validation failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError, ValidatorFunctionWrapHandler
from pydantic_core import InitErrorDetails, PydanticCustomError

Loc = tuple[str | int, ...]
RawCheck = Callable[[Any], list[tuple[Loc, str]]]


def _detail(kind: str, loc: Loc, value: object, message: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value
    )


def validate_collecting(
    title: str, data: Any, handler: ValidatorFunctionWrapHandler, raw_check: RawCheck
) -> Any:
    """``handler(data)``; when it fails, the errors of ``raw_check(data)`` are added to its own
    (except at a location the validation already reported: the same check may have run)."""
    try:
        return handler(data)
    except ValidationError as e:
        errors = e.errors()
        reported = {tuple(err["loc"]) for err in errors}
        extra = [(loc, msg) for loc, msg in raw_check(data) if loc not in reported]
        if not extra:
            raise
        details = [_detail(err["type"], tuple(err["loc"]), err["input"], err["msg"]) for err in errors]
        details += [_detail("value_error", loc, data, msg) for loc, msg in extra]
        raise ValidationError.from_exception_data(title, details) from None


def raw_list(data: Any, key: str) -> list[Any]:
    """``data[key]`` when data is a mapping and that is a list, else [] (a raw check looks only
    at what it can read; the normal validation reports the rest)."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, list) else []


def raw_names(items: list[Any], key: str = "name") -> list[str]:
    """The string ``key`` of every mapping in ``items``."""
    return [i[key] for i in items if isinstance(i, dict) and isinstance(i.get(key), str)]
