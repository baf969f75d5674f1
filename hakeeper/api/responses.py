"""The API's JSON answers and its error type, shared by the server and its route groups."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

JSON = "application/json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **facts: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.facts = facts


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":"), default=str).encode(),
        status=status,
        content_type=JSON,
        headers=headers,
    )
